import struct

import numpy as np
import pytest

from reidscale.evaluate import plot_cmc, plot_distance_histograms, plot_roc, roc_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk; fails if the file is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_png(path, returned):
    assert returned == path and path.is_file()
    width, height = png_size(path)
    assert width >= 300 and height >= 200
    assert path.stat().st_size > 10_000  # an empty axes alone is smaller


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    return rng.normal(0.5, 0.15, 500), rng.normal(1.0, 0.2, 20_000)


def test_distance_histograms_png(tmp_path, pairs):
    path = tmp_path / "sub" / "distances.png"  # parent directories are created
    check_png(path, plot_distance_histograms(*pairs, path))


def test_cmc_png_single_and_several_curves(tmp_path):
    cmc = np.minimum(1.0, 0.8 + 0.01 * np.arange(50))
    check_png(tmp_path / "one.png", plot_cmc(cmc, tmp_path / "one.png", label="trained"))
    several = plot_cmc([cmc, cmc * 0.5], tmp_path / "two.png", label=["trained", "untrained"])
    check_png(tmp_path / "two.png", several)
    with pytest.raises(ValueError, match="labels"):
        plot_cmc([cmc, cmc], tmp_path / "bad.png", label=["only one"])


def test_roc_png(tmp_path, pairs):
    roc = roc_curve(*pairs)
    path = tmp_path / "roc.png"
    check_png(path, plot_roc(roc.far, roc.tar, str(path), label="trained"))
