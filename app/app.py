"""Start the DeLoRA Gradio app: ``python app/app.py [--model DIR] [--adapters_dir DIR] [--port 7860]``.

Flags and limits: ``python app/app.py --help`` and docs/APP.md.
"""

from delora_diffusion.app import main

if __name__ == "__main__":
    main()
