"""Compose a LLaVA from a causal LM + a CLIP / SigLIP vision tower and save it once in llava-hf format.

    python scripts/build_llava.py --language-model lmsys/vicuna-7b-v1.5 \
        --vision-tower openai/clip-vit-large-patch14-336 --projector mlp2x_gelu --output checkpoints/llava-vicuna-7b

Every later load (training, ZeRO-3's partitioned load, evaluation) is then a plain from_pretrained of OUTPUT.
"""

import argparse
import logging
import os
import sys

from milora_vlm.config.checks import looks_like_hub_id
from milora_vlm.model.build import compose_llava


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--language-model", required=True, help="causal LM checkpoint (path or hub id)")
    p.add_argument("--vision-tower", required=True, help="CLIP or SigLIP checkpoint (path or hub id)")
    p.add_argument("--output", required=True, help="directory for the llava-hf checkpoint (model + processor)")
    p.add_argument("--projector", choices=["mlp2x_gelu", "linear"], default="mlp2x_gelu")
    p.add_argument("--projector-weights", help="stage-1 projector to start from (LLaVA mm_projector.bin or safetensors)")
    p.add_argument("--vision-feature-layer", type=int, default=-2)
    p.add_argument("--vision-feature-select-strategy", choices=["default", "full"], default="default")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.path.exists(args.output) and os.listdir(args.output):
        p.error(f"--output {args.output} exists and is not empty")
    for flag, value in (("--language-model", args.language_model), ("--vision-tower", args.vision_tower),
                        ("--projector-weights", args.projector_weights)):
        # a mistyped local path would otherwise end in transformers' "couldn't connect to huggingface.co"
        if value is not None and not os.path.exists(value) and (flag == "--projector-weights" or not looks_like_hub_id(value)):
            p.error(f"{flag} {value}: no such file or directory" + ("" if flag == "--projector-weights" else
                                                                    " (nor a hub name of the form owner/name)"))
    try:
        compose_llava(args.language_model, args.vision_tower, args.output, args.projector,
                      args.vision_feature_layer, args.vision_feature_select_strategy, args.projector_weights)
    except (ValueError, OSError) as e:
        print(f"build_llava: error: {e}", file=sys.stderr)
        return 2
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
