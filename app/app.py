"""Start the DeLoRA Gradio app: ``python app/app.py [--model DIR] [--adapters_dir DIR] [--port 7860]``."""

from delora_diffusion.app import main

if __name__ == "__main__":
    main()
