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
