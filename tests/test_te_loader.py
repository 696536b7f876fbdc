"""kernels.te_loader: which of torch's cuDNN libraries are preloaded for Transformer Engine."""

from kernels.te_loader import cudnn_libraries, cudnn_major


def test_cudnn_major_of_both_version_encodings():
    # cuDNN 8: major * 1000 + minor * 100 + patch; from 9 on: major * 10000 + minor * 100 + patch
    assert [cudnn_major(v) for v in (7605, 8907, 90100, 91400, 91900)] == [7, 8, 9, 9, 9]
    assert cudnn_major(None) is None


def test_preload_takes_torchs_cudnn_major_only(tmp_path):
    """Every libcudnn* of the folder was preloaded in name order: with cuDNN 8 and 9 side by side, 8's
    libraries came first and took the sonames TE resolves. Fake (empty) files: nothing is loaded here."""
    v8 = ["libcudnn.so.8", "libcudnn.so.8.9.7", "libcudnn_adv_infer.so.8", "libcudnn_cnn_train.so.8"]
    v9 = [
        "libcudnn.so.9",
        "libcudnn_engines_precompiled.so.9",
        "libcudnn_graph.so.9",
        "libcudnn_ops.so.9.19.0",
    ]
    other = ["libcudnn.so", "libcudnn.so.90", "libcublas.so.12", "libcudnn_graph.so.9.txt~", "cudnn.h"]
    for name in v8 + v9 + other:
        (tmp_path / name).write_bytes(b"")
    assert cudnn_libraries(str(tmp_path), 9) == [str(tmp_path / n) for n in sorted(v9)]
    assert cudnn_libraries(str(tmp_path), 8) == [str(tmp_path / n) for n in sorted(v8)]


def test_import_hook_runs_before_anyones_import_of_te(tmp_path):
    """accelerate / peft (imported by diffusers) import Transformer Engine themselves, past import_te: diffusers'
    Wan model then failed to import on the H200 (undefined cuDNN symbol). ``import kernels`` installs a hook
    that runs the preload before the first lookup of transformer_engine, whoever makes it. A stand-in
    transformer_engine package (TE does not install here) reads, as its first line runs, whether it has."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "transformer_engine").mkdir()
    (tmp_path / "transformer_engine" / "__init__.py").write_text(
        "import sys\nHOOK_RAN_FIRST = sys.modules['kernels.te_loader']._hook_ran\n"
    )
    code = (
        "import sys, importlib.util\n"
        "import kernels\n"
        "from kernels import te_loader\n"
        "assert not te_loader._hook_ran\n"
        "assert not te_loader.install_import_hook(), 'installed twice'\n"
        "import transformer_engine\n"  # as a third party would: not through import_te
        "assert transformer_engine.HOOK_RAN_FIRST, 'TE ran before the preload'\n"
        "assert not any(isinstance(f, te_loader._PreloadBeforeTE) for f in sys.meta_path), 'hook left behind'\n"
        "assert not te_loader.install_import_hook(), 'installed after TE was imported'\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": f"{root}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
