"""DreamBooth with DeLoRA adapters, for SD1.x/2.x, SDXL, SD3 and Flux pipelines.

    accelerate launch train_scripts/dreambooth_delora.py \\
        --pretrained_model_name_or_path PATH_OR_HUB_ID --instance_data_dir ./dog \\
        --instance_prompt "a photo of sks dog" --output_dir ./out

Flags are those of diffusers' train_dreambooth_lora*.py plus --delora_* (see --help). With no flags it trains
the bundled tiny model on the bundled subject into outputs/dreambooth-delora. The work is done by
delora_diffusion.training; this file only runs it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from delora_diffusion.training import main

if __name__ == "__main__":
    sys.exit(main())
