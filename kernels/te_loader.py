"""Importing Transformer Engine next to torch: one place for the attention backend "te" and the engine's
FP8 linears (engine.precision).

TE looks for cuDNN in $CUDNN_PATH, CUDA_HOME and the loader's path before pip's, and its core library
names libcudnn_cnn etc. as dependencies. On a machine with a system cuDNN older than torch's (the lent GPU
image: 9.14 in /usr/lib, torch's wheel 9.19), the loader took the system's libcudnn_cnn once torch had run
cuDNN, and that needs symbols of its own libcudnn_graph, not of the one torch had loaded:
"undefined symbol ... version libcudnn_graph.so.9" on import (H200, 2026-11-27; with torch's folder first on
LD_LIBRARY_PATH, TE loaded). So before the import every library of torch's cuDNN major in its folder is
loaded globally (a dependency by soname then resolves to it), and $CUDNN_PATH points there.

Other libraries import TE too (the image's accelerate and peft do when it is installed, and diffusers imports
them): diffusers' Wan model failed to import with the same undefined symbol after our model had run cuDNN
attention (H200, 2026-11-27, bench.gpu_models). So ``import kernels`` installs an import hook that preloads
torch's cuDNN before the first lookup of ``transformer_engine``, whoever imports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.abc
import os
import re
import sys
import warnings
from typing import Any

import torch


def loaded_library_dir(stem: str) -> str | None:
    """The folder of the shared library ``<stem>.so*`` this process has mapped (Linux), else None."""
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split(None, 5)[-1].strip() for line in f if ".so" in line]
    except OSError:
        return None
    for path in paths:
        name = os.path.basename(path)
        if name == f"{stem}.so" or name.startswith(f"{stem}.so."):
            return os.path.dirname(path)
    return None


def cudnn_major(version: int | None) -> int | None:
    """The major of torch.backends.cudnn.version(): 8.9.7 is 8907 (major * 1000 + ...), 9.19.0 is 91900
    (major * 10000 + ..., from cuDNN 9 on)."""
    if not version:
        return None
    return version // 10000 if version >= 10000 else version // 1000


def cudnn_libraries(folder: str, major: int | None) -> list[str]:
    """The paths of folder's libcudnn*.so.<major>[.*] in name order (all libcudnn*.so* when major is None): a
    folder holding two cuDNN majors must not load the other one's libraries first."""
    pattern = re.compile(r"libcudnn\w*\.so" + (rf"\.{major}(\.\d+)*" if major is not None else r".*"))
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if pattern.fullmatch(n)]


@functools.cache
def use_torch_cudnn() -> str | None:
    """Preload torch's cuDNN folder for TE (module doc); the folder, or None when there is nothing to do
    (no CUDA, or no cuDNN mapped). Once per process: import_te runs it on every call, and the trainer's
    fp8_context calls that every step (it read /proc/self/maps and reloaded the libraries each time). A
    $CUDNN_PATH / $CUDNN_HOME the user set is kept (TE loads its libcudnn from there), with a warning when it
    is not torch's folder: TE and torch then run two cuDNNs."""
    if not torch.cuda.is_available():
        return None
    version = None
    with contextlib.suppress(Exception):
        version = torch.backends.cudnn.version()  # loads torch's libcudnn if nothing has yet
    folder = loaded_library_dir("libcudnn")
    if not folder:
        return None
    for path in cudnn_libraries(folder, cudnn_major(version)):
        with contextlib.suppress(OSError):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    user = os.environ.get("CUDNN_HOME") or os.environ.get("CUDNN_PATH")
    if not user:
        os.environ["CUDNN_PATH"] = folder
    elif os.path.realpath(user) not in (os.path.realpath(folder), os.path.realpath(os.path.dirname(folder))):
        warnings.warn(
            f"CUDNN_PATH/CUDNN_HOME={user} is not the cuDNN torch loaded ({folder}); Transformer Engine "
            "will load its libcudnn from there, and two cuDNN versions in one process can fail to link",
            stacklevel=2,
        )
    return folder


def import_te() -> Any:
    """``transformer_engine.pytorch``, loaded against torch's cuDNN. Raises what the import raises:
    ImportError when TE is missing, RuntimeError / OSError when its CUDA libraries fail to load."""
    use_torch_cudnn()
    import transformer_engine.pytorch as te

    return te


def te_autocast(recipe: Any, group: Any = None) -> contextlib.AbstractContextManager:
    """TE's FP8 autocast with ``recipe`` (a transformer_engine.common.recipe object), amax reduced over
    ``group``, under the name the installed TE has."""
    te = import_te()
    if hasattr(te, "autocast"):  # TE >= 2.8 renamed fp8_autocast
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


_hook_ran = False  # the hook below has run (tests read it)


class _PreloadBeforeTE(importlib.abc.MetaPathFinder):
    """A meta path finder that finds nothing: the first lookup of ``transformer_engine`` (an import, or
    importlib.util.find_spec) runs :func:`use_torch_cudnn` first, then the hook removes itself."""

    def find_spec(self, fullname, path=None, target=None):
        global _hook_ran
        if fullname == "transformer_engine":
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
            _hook_ran = True
            try:
                use_torch_cudnn()
            except Exception as e:  # the import goes on and raises what it raises
                warnings.warn(f"preloading torch's cuDNN for Transformer Engine failed: {e!r}", stacklevel=2)
        return None


def install_import_hook() -> bool:
    """Preload torch's cuDNN before anyone's first import of Transformer Engine (module doc). False when TE is
    imported already (too late) or the hook is in place."""
    if "transformer_engine" in sys.modules or any(isinstance(f, _PreloadBeforeTE) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _PreloadBeforeTE())
    return True
