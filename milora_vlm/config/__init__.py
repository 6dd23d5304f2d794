"""Training recipes: YAML files with typed, validated sections, and command-line overrides of the same keys.

    schema.py   the sections as dataclasses; each field's help and choices next to it (`train_vlm.py --help`)
    parsing.py  YAML (duplicate keys and alias bombs refused: read_yaml), --key value overrides, values typed and checked per field
    checks.py   cross-field, path and DeepSpeed checks, and what this machine's hardware can honour

Everything that can be checked without loading a model is checked in `load_recipe`: unknown keys (with a
"did you mean"), wrong types, choices, missing paths and contradictory settings; each error names the key and
the fix. The one check that needs the model (adapter rank against each target matrix) is
milora_vlm.model.trainable.check_adapter_targets. Command-line overrides go through the same typed parser:
    --adapter.r 64  --data.train_file x.jsonl  --max_steps 10  --training.seed 3  --deepspeed configs/zero2.json
"""

from .checks import resolve_hardware
from .parsing import apply_overrides, build_recipe, load_recipe, parse_overrides, read_yaml, training_argument_types
from .schema import (
    RECIPE_FILENAME,
    RESUME_AUTO,
    ConfigError,
    DataSection,
    GuardsSection,
    ModelSection,
    Recipe,
    TrainableSection,
    describe_keys,
)

__all__ = [
    "RECIPE_FILENAME",
    "read_yaml",
    "RESUME_AUTO",
    "ConfigError",
    "DataSection",
    "GuardsSection",
    "ModelSection",
    "Recipe",
    "TrainableSection",
    "apply_overrides",
    "build_recipe",
    "describe_keys",
    "load_recipe",
    "parse_overrides",
    "resolve_hardware",
    "training_argument_types",
]
