"""The torch saliency backend against OpenCV, on real photographs and on random images."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain import frequency_tuned
from pretrain.saliency import METHODS, compute_saliency, saliency_peaks

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


def photograph(name: str) -> torch.Tensor:
    return torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1).float().div(255)


def random_images(count: int = 3, size=(224, 224), seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, *size, generator=torch.Generator().manual_seed(seed))


def assert_agrees_with_opencv(images: torch.Tensor, method: str) -> None:
    """Per image: Pearson r >= 0.99, and the torch peak within 2 px of OpenCV's peak or on a
    pixel where OpenCV's map is within 1% of its maximum."""
    ours = compute_saliency(images, method, backend="torch")
    reference = compute_saliency(images, method, backend="opencv")
    assert ours.shape == reference.shape == (images.shape[0], *images.shape[-2:])
    for a, b, peak_a, peak_b in zip(ours, reference, saliency_peaks(ours), saliency_peaks(reference)):
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert r >= 0.99, f"{method}: correlation {r:.4f}"
        near = (peak_a - peak_b).abs().max() <= 2
        high = b[peak_a[0], peak_a[1]] >= 0.99 * b.max()
        assert near or high, f"{method}: torch peak {peak_a.tolist()} vs OpenCV {peak_b.tolist()}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", PHOTOS)
def test_torch_matches_opencv_on_photographs(method, name):
    assert_agrees_with_opencv(photograph(name)[None], method)


@pytest.mark.parametrize("method", METHODS)
def test_torch_matches_opencv_on_random_images(method):
    assert_agrees_with_opencv(random_images(), method)


def test_fine_grained_is_bit_exact_on_224_images():
    """Grey conversion, blurs, neighbourhood means and 8-bit truncations follow OpenCV step by
    step, so the maps are equal, not merely correlated."""
    images = torch.cat([random_images(2), torch.nn.functional.interpolate(
        photograph("chelsea")[None], size=(224, 224), mode="bilinear", align_corners=False)])
    assert torch.equal(compute_saliency(images, backend="torch"),
                       compute_saliency(images, backend="opencv"))


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_in_unit_range_on_the_input_device_for_any_shape(method):
    for size in [(37, 91), (5, 3), (1, 1)]:
        maps = compute_saliency(random_images(2, size), method)
        assert maps.shape == (2, *size) and maps.dtype == torch.float32
        assert maps.min() >= 0 and maps.max() <= 1 and torch.isfinite(maps).all()


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_one_at_a_time(method):
    images = random_images(4, (48, 64))
    batched = compute_saliency(images, method)
    single = torch.cat([compute_saliency(image[None], method) for image in images])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6)


def test_uint8_images_give_the_same_maps_as_their_float_values():
    images = (random_images(2, (40, 56)) * 255).round().to(torch.uint8)
    for method in METHODS:
        torch.testing.assert_close(compute_saliency(images, method),
                                   compute_saliency(images.float() / 255, method), rtol=0, atol=1e-5)


def reference_frequency_tuned(images: torch.Tensor) -> torch.Tensor:
    """Frequency tuned written plainly, in float64: OpenCV's float RGB -> Lab with its
    constants and masked branches, a 5 x 5 binomial convolution over reflected borders, the
    distance to the mean colour scaled to a peak of 1."""
    x = images.double() / 255 if images.dtype == torch.uint8 else images.double().clamp(0, 1)
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    rgb_to_xyz = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                               [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
    white = torch.tensor([0.950456, 1.0, 1.088754], dtype=torch.float64).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", rgb_to_xyz, linear) / white
    f = torch.where(xyz > 0.008856, xyz ** (1 / 3), 7.787 * xyz + 16 / 116)
    lab = torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)
    binomial = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16
    kernel = torch.outer(binomial, binomial).expand(3, 1, 5, 5)
    blurred = F.conv2d(F.pad(lab, (2, 2, 2, 2), mode="reflect"), kernel, groups=3)
    distance = (blurred - lab.mean(dim=(2, 3), keepdim=True)).norm(dim=1)
    return (distance / distance.amax(dim=(1, 2), keepdim=True)).float()


def frequency_tuned_inputs() -> list[torch.Tensor]:
    """Real photographs as uint8 and as floats, and random uint8 and float batches of odd
    sizes (the floats partly outside [0, 1])."""
    generator = torch.Generator().manual_seed(0)
    photos = [torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1)[None]
              for name in ("astronaut", "chelsea", "coffee")]
    return [*photos, *(photo.float() / 255 for photo in photos),
            torch.randint(0, 256, (7, 3, 50, 61), generator=generator, dtype=torch.uint8),
            torch.rand(7, 3, 37, 91, generator=generator) * 1.4 - 0.2]


@pytest.mark.parametrize("chunk_pixels", [None, 7000], ids=["default_chunks", "two_images_a_chunk"])
def test_frequency_tuned_equals_the_straightforward_formulation(chunk_pixels, monkeypatch):
    """The fast path (8-bit lookup table, exp2/log2 powers, masks folded away, box-sum blur,
    chunks) gives the plain formulation's maps up to float32 rounding."""
    if chunk_pixels is not None:
        monkeypatch.setattr(frequency_tuned, "_CPU_CHUNK_PIXELS", chunk_pixels)
    for images in frequency_tuned_inputs():
        torch.testing.assert_close(compute_saliency(images, "frequency_tuned"),
                                   reference_frequency_tuned(images), rtol=0, atol=5e-6)


def test_salient_square_is_found():
    """A bright square on a flat background is where every detector peaks."""
    image = torch.full((1, 3, 96, 128), 0.3)
    image[:, :, 60:70, 20:30] = 1.0
    for method in METHODS:
        row, col = saliency_peaks(compute_saliency(image, method))[0].tolist()
        assert 52 <= row <= 78 and 12 <= col <= 38, (method, row, col)


def test_peaks_follow_rows_then_columns():
    maps = torch.zeros(2, 5, 7)
    maps[0, 3, 6] = 1
    maps[1, 0, 2] = -1
    assert saliency_peaks(maps).tolist() == [[3, 6], [0, 0]]
    assert saliency_peaks(maps, lowest=True)[1].tolist() == [0, 2]


@pytest.mark.parametrize("bad, message", [
    (dict(method="basnet"), "unknown saliency method 'basnet'"),
    (dict(backend="jax"), "unknown saliency backend 'jax'"),
])
def test_unknown_method_or_backend_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        compute_saliency(random_images(1, (8, 8)), **bad)


def test_wrong_shape_or_dtype_is_reported():
    with pytest.raises(ValueError, match=r"B x 3 x H x W, got \(3, 8, 8\)"):
        compute_saliency(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"got \(1, 1, 8, 8\)"):
        compute_saliency(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="int64"):
        compute_saliency(torch.zeros(1, 3, 8, 8, dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    images = random_images(4)
    on_gpu = compute_saliency(images.cuda(), method)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), compute_saliency(images, method), rtol=0, atol=2e-3)
