"""``DATA.BACKEND device``: the loader workers only read each JPEG's bytes and draw its
augmentation; the training process decodes the batch on the training device
(``torchvision.io.decode_jpeg``: nvJPEG on CUDA, libjpeg-turbo on the CPU) and crops, resizes,
flips, jitters, lights and normalises it there, batched. PIL in the workers managed about 150
ImageNet images per second per core, which leaves eight GPUs waiting on any node.

The draws are the PIL pipeline's (``pretrain.data.train_transform``): the same torchvision
functions called in the same order under the same ``(SEED, epoch, index)`` seed, so both
backends crop and flip the same boxes. Files the device decoder does not take (a CMYK JPEG, a
PNG under a ``.JPEG`` name: ImageNet's train set holds both) are decoded by PIL in the worker,
and logged once per file by the training process; a file whose bytes fail to decode there too
is replaced by the batch's next image and listed with the unreadable files.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from pretrain.config import LIGHTING_EIGENVALUES, LIGHTING_EIGENVECTORS

logger = logging.getLogger(__name__)

BACKENDS = ("pil", "device")
DEVICE_DECODED_MODES = ("RGB", "L")  # the JPEG colour spaces nvJPEG decodes to RGB
_GRAY = (0.299, 0.587, 0.114)  # PIL's RGB-to-L weights
# The per-image parameters, one row per image: crop box, flip, jitter factors and order, lighting.
TOP, LEFT, HEIGHT, WIDTH, FLIP, BRIGHTNESS, CONTRAST, SATURATION = range(8)
ORDER = slice(8, 12)
LIGHTING = slice(12, 15)


@dataclass
class EncodedImage:
    """One file as a worker hands it over: its bytes for the device decoder, or (for a file the
    device decoder does not take) its pixels decoded by PIL, as a uint8 CHW tensor."""
    path: str
    data: torch.Tensor
    encoded: bool
    width: int
    height: int
    form: str  # PIL's format and mode, for the log

    def stand_in(self) -> torch.Tensor:
        """A tensor of the image's size that holds no pixels, for torchvision's parameter draws
        (they read only the size)."""
        return torch.empty(1, 1, 1).expand(1, self.height, self.width)


def read_encoded(path: str) -> EncodedImage:
    """The file's bytes and, from its header alone, its size and whether the device decodes it;
    raises (as PIL's loader does) for a file that is not an image."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        form = f"{image.format} {image.mode}"
        if image.format == "JPEG" and image.mode in DEVICE_DECODED_MODES:
            return EncodedImage(path, torch.frombuffer(bytearray(data), dtype=torch.uint8), True, width, height, form)
        pixels = F.pil_to_tensor(image.convert("RGB"))
    return EncodedImage(path, pixels, False, width, height, form)


class TrainDraw:
    """The random parameters of ``pretrain.data.train_transform("imagenet")`` for one image,
    drawn in its order: crop box, flip, jitter order and factors, lighting noise."""

    def __init__(self, cfg):
        self.crop = transforms.RandomResizedCrop(cfg.DATA.IMAGE_SIZE, scale=tuple(cfg.DATA.CROP_SCALE))
        jitter = cfg.DATA.COLOR_JITTER
        self.jitter = transforms.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter) if jitter else None
        self.lighting_std = cfg.DATA.LIGHTING_STD

    def __call__(self, image: EncodedImage) -> tuple[EncodedImage, torch.Tensor]:
        box = self.crop.get_params(image.stand_in(), self.crop.scale, self.crop.ratio)
        flip = float(torch.rand(1) < 0.5)
        factors, order = [1.0, 1.0, 1.0], [0, 1, 2, 3]
        if self.jitter is not None:
            drawn_order, *factors, _ = self.jitter.get_params(
                self.jitter.brightness, self.jitter.contrast, self.jitter.saturation, self.jitter.hue)
            order = drawn_order.tolist()
        noise = (torch.randn(3) * self.lighting_std).tolist() if self.lighting_std else [0.0, 0.0, 0.0]
        return image, torch.tensor([*box, flip, *factors, *order, *noise], dtype=torch.float)


def no_draw(image: EncodedImage) -> tuple[EncodedImage, torch.Tensor]:
    """The evaluation transform draws nothing."""
    return image, torch.zeros(0)


@dataclass
class EncodedBatch:
    images: list[EncodedImage]
    params: torch.Tensor


def collate_encoded(items: list) -> tuple[EncodedBatch, torch.Tensor, list[str]]:
    """A batch of ``((EncodedImage, params), label, unreadable)`` items, kept as a list: the
    files differ in length."""
    samples, labels, unreadable = zip(*items)
    return (EncodedBatch([image for image, _ in samples], torch.stack([params for _, params in samples])),
            torch.tensor(labels), list(unreadable))


class DeviceDecoder:
    """Decodes batches on one device; the files it hands to the CPU are logged once each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.decoded_on_cpu: set[str] = set()

    def __call__(self, batch: EncodedBatch) -> tuple[list[torch.Tensor | None], list[str]]:
        """Each image as uint8 CHW RGB on the device (``None`` for a file that no decoder
        read) and the paths of those files."""
        for image in batch.images:
            if not image.encoded:
                self._note_cpu(image, "the device decoder takes RGB and grayscale JPEGs")
        decoded = [image.data.to(self.device) if not image.encoded else None for image in batch.images]
        encoded = [at for at, image in enumerate(batch.images) if image.encoded]
        try:
            pixels = decode_jpeg([batch.images[at].data for at in encoded], mode=ImageReadMode.RGB,
                                 device=self.device) if encoded else []
        except RuntimeError:  # one file refused: decode them one by one to find it
            pixels = [self._decode_one(batch.images[at]) for at in encoded]
        for at, image in zip(encoded, pixels):
            decoded[at] = image
        unreadable = [image.path for image, pixels in zip(batch.images, decoded) if pixels is None]
        for path in unreadable:
            logger.warning("unreadable image %s; using the batch's next image instead", path)
        return decoded, unreadable

    def _decode_one(self, image: EncodedImage) -> torch.Tensor | None:
        try:
            return decode_jpeg(image.data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            with Image.open(io.BytesIO(image.data.numpy().tobytes())) as opened:
                pixels = F.pil_to_tensor(opened.convert("RGB"))
        except Exception:
            return None
        self._note_cpu(image, "the device decoder refused it")
        return pixels.to(self.device)

    def _note_cpu(self, image: EncodedImage, why: str) -> None:
        if image.path not in self.decoded_on_cpu:
            self.decoded_on_cpu.add(image.path)
            logger.info("decoded %s (%s) on the CPU: %s; %d such files so far", image.path, image.form, why,
                        len(self.decoded_on_cpu))


def replace_unreadable(images: list[torch.Tensor | None],
                       labels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each missing image (and its label) replaced by the batch's next readable one."""
    readable = [at for at, image in enumerate(images) if image is not None]
    if not readable:
        raise RuntimeError("no image of the batch could be decoded")
    labels = labels.clone()
    for at, image in enumerate(images):
        if image is None:
            source = next((other for other in readable if other > at), readable[0])
            images[at], labels[at] = images[source], labels[source]
    return images, labels


def resized_crops(images: list[torch.Tensor], params: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's crop box, resized to ``size`` x ``size`` (bilinear with antialias, as PIL's
    resize), as one uint8 batch."""
    boxes = params[:, [TOP, LEFT, HEIGHT, WIDTH]].long().tolist()
    return torch.stack([F.resized_crop(image, top, left, height, width, [size, size], antialias=True)
                        for image, (top, left, height, width) in zip(images, boxes)])


def centre_crops(images: list[torch.Tensor], resize: int, size: int) -> torch.Tensor:
    """``Resize(resize)`` then ``CenterCrop(size)`` of each image, as one uint8 batch."""
    return torch.stack([F.center_crop(F.resize(image, [resize], antialias=True), [size, size]) for image in images])


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(other, images, ratio)`` on whole pixel values: clipped to 0-255 and
    truncated, as PIL stores each step's result in 8 bits."""
    return (other + ratio * (images - other)).clamp_(0, 255).floor_()


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """PIL's conversion to L: whole values, rounded."""
    weights = images.new_tensor(_GRAY).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True).round_()


def colour_jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ColorJitter's brightness, contrast and saturation on whole pixel values (0-255), each
    image in its own drawn order, as PIL's ``ImageEnhance`` computes them: blending in float
    alone left the images 1.4 levels brighter on average than PIL's, which truncates each step
    (factor 1 leaves an image as it is, so every image goes through every step)."""
    order = params[:, ORDER].to(images.device)
    factors = params[:, [BRIGHTNESS, CONTRAST, SATURATION]].to(images.device)
    for position in range(order.shape[1]):
        for step in range(3):  # no test of whether any image takes this step: on a GPU it would wait
            chosen = order[:, position] == step
            ratio = torch.where(chosen, factors[:, step], torch.ones_like(factors[:, step])).view(-1, 1, 1, 1)
            if step == 0:
                images = _blend(images, torch.zeros_like(images), ratio)
            elif step == 1:  # towards the mean gray level, rounded
                images = _blend(images, (_grayscale(images).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor_(), ratio)
            else:
                images = _blend(images, _grayscale(images), ratio)
    return images


def lighting(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """AlexNet's PCA lighting noise, ``V (alpha * lambda)`` added to each image."""
    alpha = params[:, LIGHTING].to(images.device)
    eigenvalues = images.new_tensor(LIGHTING_EIGENVALUES)
    eigenvectors = images.new_tensor(LIGHTING_EIGENVECTORS)
    shift = (alpha * eigenvalues) @ eigenvectors.T
    return images + shift.view(-1, 3, 1, 1)


class DeviceBatches:
    """Turns the workers' encoded batches into the network's input on ``device``."""

    def __init__(self, cfg, train: bool, device: torch.device, normalize: bool = True):
        self.cfg = cfg
        self.train = train
        self.normalize = normalize
        self.decoder = DeviceDecoder(device)

    def __call__(self, batch: EncodedBatch, labels: torch.Tensor):
        """(images on the device, labels on the host, unreadable paths, the batch on the host:
        none here)."""
        decoded, unreadable = self.decoder(batch)
        if unreadable:
            decoded, labels = replace_unreadable(decoded, labels)
        data = self.cfg.DATA
        if self.train:
            images = resized_crops(decoded, batch.params, data.IMAGE_SIZE)
            flip = batch.params[:, FLIP].to(images.device).bool().view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images).float()
            if data.COLOR_JITTER:
                images = colour_jitter(images, batch.params)
            images = images.div_(255)
            if data.LIGHTING_STD:
                images = lighting(images, batch.params)
        else:
            images = centre_crops(decoded, data.VAL_RESIZE, data.IMAGE_SIZE).float().div_(255)
        if self.normalize:
            images = F.normalize(images, list(data.MEAN), list(data.STD))
        return images, labels, unreadable, None


class HostBatches:
    """The PIL backend's batches, ready on the host: copied to ``device``."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, batch: torch.Tensor, labels: torch.Tensor):
        return batch.to(self.device, non_blocking=True), labels, [], batch


def batch_preparer(cfg, train: bool, device: torch.device, normalize: bool = True) -> DeviceBatches | HostBatches:
    """What turns a loader's batch into ``(images on device, labels on the host, unreadable
    paths, the images on the host or None)`` for ``DATA.BACKEND``."""
    if cfg.DATA.BACKEND == "device":
        return DeviceBatches(cfg, train, device, normalize)
    return HostBatches(device)
