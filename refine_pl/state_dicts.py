"""Comparing a file's state_dict with a network's: wrapper prefixes, and what differs, said in one line."""

from torch import Tensor

KEY_PREFIXES = ("net.", "module.", "model.")
"""Wrapper prefixes that every key of a saved state_dict may carry: refine-pl's ``net.``, DDP's ``module.``, and
``model.`` of Lightning modules that hold their network as ``model``."""


def fitting_state_dict(expected: dict[str, Tensor], found: dict[str, Tensor]) -> dict[str, Tensor]:
    """``found`` with the keys of ``expected``: as they are, else with wrapper prefixes removed one at a time.

    The keys are tried as they are first, so a network that holds its layers as ``self.net`` (or ``self.model``)
    keeps its own prefix; then without each wrapper prefix that every key shares (``net.`` of refine-pl,
    ``module.`` of DDP, ...). When no form has exactly the expected keys, the one sharing the most keys with
    ``expected`` (the most stripped on a tie) comes back, for :func:`describe_key_mismatch` to describe.
    """
    forms = [found]
    while prefix := next((p for p in KEY_PREFIXES if forms[-1] and all(k.startswith(p) for k in forms[-1])), None):
        forms.append({key[len(prefix) :]: value for key, value in forms[-1].items()})
    exact = next((form for form in forms if form.keys() == expected.keys()), None)
    if exact is not None:
        return exact
    return max(reversed(forms), key=lambda form: len(form.keys() & expected.keys()))


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
