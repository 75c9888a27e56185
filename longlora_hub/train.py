"""The training recipe from an installed package, under `accelerate launch` too:

    accelerate launch -m longlora_hub.train --config smollm2-135m/32k_extend
    accelerate launch --config_file PATH/zero2.yaml -m longlora_hub.train --config llama-2-7b/32k_extend

It runs `recipes/sft.py` (shipped as `longlora_hub.recipes.sft`), as `longlora-hub train` does.
"""

from longlora_hub.recipes.sft import run

if __name__ == "__main__":
    run()
