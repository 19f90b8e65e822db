"""Comparing a file's state_dict with a network's: wrapper prefixes, and what differs, said in one line."""

from torch import Tensor

KEY_PREFIXES = ("net.", "module.", "model.")
"""Wrapper prefixes that every key of a saved state_dict may carry: refine-pl's ``net.``, DDP's ``module.``, and
``model.`` of Lightning modules that hold their network as ``model``."""


def strip_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Removes wrapper prefixes shared by every key (``net.`` of refine-pl, ``module.`` of DDP, ...)."""
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in KEY_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
                stripped = True
    return state_dict


def _some(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def describe_key_mismatch(expected: dict[str, Tensor], found: dict[str, Tensor]) -> str | None:
    """Says how the keys and shapes of a state_dict differ from a network's, or None when they agree.

    Names a few of the missing and unexpected keys with their counts, the first shape differences, and,
    when every key of the file carries one extra leading component (``backbone.``, ``1.``, ...), that prefix.
    """
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    resized = [
        f"size mismatch for {key}: file {list(found[key].shape)}, model {list(expected[key].shape)}"
        for key in expected
        if key in found and found[key].shape != expected[key].shape
    ]
    if not (missing or unexpected or resized):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing from the file ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys in the file ({_some(unexpected)})")
    parts += resized[:3]
    prefixes = {key.split(".", 1)[0] for key in found}
    if len(prefixes) == 1 and all("." in key for key in found):
        prefix = f"{prefixes.pop()}."
        if {key[len(prefix) :] for key in found} == set(expected):
            parts.append(f"every key in the file starts with {prefix!r}: save the inner network's state_dict")
    return "; ".join(parts)
