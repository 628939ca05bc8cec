"""The torch and Triton versions ember supports, checked once at import.

ember runs on the torch and Triton a user already has (a GPU machine's CUDA torch brings its own
Triton), so the range is wide and tested at both ends: torch 2.11 (the lent H200's 2.11.0+cu130) to
2.14, triton 3.6 to 3.9. pyproject.toml declares the same range; keep the two in step.

  * torch below the range: ImportError, since ember's custom-op and autograd registration use APIs
    that older releases lack.
  * torch above the range: a warning; it probably works, but nobody has run the tests on it.
  * triton outside its range: the Triton backend is switched off with the reason (``why_triton_off``),
    shown by ``python -m ember info``; the C++ backends do not need Triton at all.
  * triton 3.6's interpreter (TRITON_INTERPRET=1) breaks with NumPy >= 2.4 (NumPy scalars became
    shape-(1,) arrays there): the interpreter backend is switched off with that reason.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings

TORCH_MIN, TORCH_MAX = (2, 11), (2, 14)
TRITON_MIN, TRITON_MAX = (3, 6), (3, 9)


def _major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"unrecognised version string {version!r}")
    return int(m.group(1)), int(m.group(2))


def _fmt(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def check_torch(version: str) -> str | None:
    """Raise ImportError for a torch older than the range; return a warning text for a newer one."""
    v = _major_minor(version)
    if v < TORCH_MIN:
        raise ImportError(
            f"ember needs torch >= {_fmt(TORCH_MIN)} (supported: {_fmt(TORCH_MIN)}-{_fmt(TORCH_MAX)}), found torch "
            f"{version}. Upgrade torch, or install an older ember.")
    if v > TORCH_MAX:
        return (f"ember is tested with torch {_fmt(TORCH_MIN)}-{_fmt(TORCH_MAX)}; torch {version} is newer and untested "
                f"(set EMBER_SKIP_VERSION_CHECK=1 to silence this)")
    return None


def triton_problem(triton_version: str, numpy_version: str | None, interpreting: bool) -> str | None:
    """Why the Triton backend cannot be used with these versions, or None."""
    v = _major_minor(triton_version)
    if not TRITON_MIN <= v <= TRITON_MAX:
        return (f"triton {triton_version} is outside ember's supported {_fmt(TRITON_MIN)}-{_fmt(TRITON_MAX)} "
                f"(pip install 'triton>={_fmt(TRITON_MIN)},<{TRITON_MAX[0]}.{TRITON_MAX[1] + 1}')")
    if interpreting and v < (3, 7) and numpy_version is not None and _major_minor(numpy_version) >= (2, 4):
        return (f"the triton {triton_version} interpreter breaks with numpy {numpy_version} (>= 2.4 turns scalars "
                f"into shape-(1,) arrays); pip install 'numpy<2.4'")
    return None


@functools.lru_cache(maxsize=None)
def why_triton_off() -> str | None:
    """None when the installed triton (if any) is usable; else the reason. No triton: None (the
    backend registry reports a missing triton itself)."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    numpy_version = None
    if importlib.util.find_spec("numpy") is not None:
        import numpy

        numpy_version = numpy.__version__
    return triton_problem(triton.__version__, numpy_version, os.environ.get("TRITON_INTERPRET", "0") == "1")


def check_at_import() -> None:
    import torch

    note = check_torch(torch.__version__)
    if note and os.environ.get("EMBER_SKIP_VERSION_CHECK", "0") != "1":
        warnings.warn(note, RuntimeWarning, stacklevel=3)
