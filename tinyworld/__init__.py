"""The tiny world: a synthetic text-to-image domain the project renders itself, used to test the product end to end.

`grammar` defines the prompts (colour, counting, position, binding) and the train/tune/held-out splits,
`render` draws ground-truth images for a prompt, and `oracle` checks any image against its prompt.
The names below are re-exported lazily, so `python -m tinyworld.grammar` (or `.oracle`) runs
its module once, without runpy's "found in sys.modules" warning.
"""
from importlib import import_module

_EXPORTS = {
    "grammar": ("CATEGORIES", "COLOURS", "RELATIONS", "SHAPES", "STYLES", "Obj", "Scene", "all_prompts",
                "all_scenes", "heldout_pairs", "parse", "read_prompt_file", "split_sizes", "splits", "variants",
                "write_prompt_files"),
    "render": ("BACKGROUND", "PALETTE", "PlacementError", "render", "render_batch"),
    "oracle": ("Blob", "OracleResult", "benchmark", "check", "evaluate", "find_blobs"),
}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
