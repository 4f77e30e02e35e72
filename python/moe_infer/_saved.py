"""Reading what moe_infer saves with torch.save (routing traces, load records)."""

import torch


def load_saved_dict(path: str, owner: str, what: str, keys: set) -> dict:
    """The dict saved at ``path``, with at least ``keys``. ValueError naming ``owner`` if the file
    is not a readable ``what`` (truncated, not a torch file, unsafe content) or lacks a key."""
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as error:  # truncated, not a torch file, or unsafe content
        raise ValueError(f"{owner}: '{path}' is not a readable {what} ({error})") from error
    if not isinstance(saved, dict) or not keys <= saved.keys():
        raise ValueError(f"{owner}: '{path}' lacks {'/'.join(sorted(keys))}")
    return saved
