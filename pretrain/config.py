"""Pretraining configuration: fvcore ``CfgNode`` defaults that hold the paper's ImageNet recipe.

YAML files under ``configs/pretrain/`` override these (``_BASE_`` chains files), and command-line
``KEY VALUE`` pairs override the files, as in Detectron2.
"""
from fvcore.common.config import CfgNode as CN

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# AlexNet's PCA of ImageNet RGB pixels, used for its lighting noise (and by the official code).
LIGHTING_EIGENVALUES = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGENVECTORS = ((-0.5675, 0.7192, 0.4009),
                         (-0.5808, -0.0045, -0.8140),
                         (-0.5836, -0.6948, 0.4203))


def get_cfg() -> CN:
    """A fresh copy of the defaults (ResNet-50, 300 epochs, no mixing)."""
    cfg = CN()
    cfg.OUTPUT_DIR = "output/pretrain"
    cfg.SEED = 0
    cfg.LOG_PERIOD = 20  # iterations between log lines (and non-finite loss checks)

    cfg.MODEL = CN()
    cfg.MODEL.ARCH = "resnet50"  # a torchvision ResNet (resnet18 ... resnet152) or wideresnet28_10
    cfg.MODEL.STEM = "imagenet"  # imagenet (7x7 stride 2 + max pool) | cifar (3x3 stride 1, for 32 px)
    cfg.MODEL.DROPOUT = 0.0  # inside WideResNet blocks
    # torchvision ResNets: the last BN of each residual block starts at zero, so every block starts
    # as the identity (Goyal et al. 2017); steadier early training on small batches. The paper's
    # code does not do it.
    cfg.MODEL.ZERO_INIT_RESIDUAL = False
    cfg.MODEL.NUM_CLASSES = 1000
    cfg.MODEL.WEIGHTS = ""  # for --eval-only: a checkpoint to evaluate (default: the last one)
    cfg.MODEL.CHANNELS_LAST = True
    cfg.MODEL.COMPILE = False  # torch.compile the model

    cfg.DATA = CN()
    cfg.DATA.DATASET = "imagefolder"  # imagefolder | cifar10 | cifar100
    cfg.DATA.ROOT = ""  # ImageNet folder with train/ and val/, or the CIFAR archive's folder; empty: $IMAGENET_ROOT
    cfg.DATA.TRAIN_DIR = "train"
    cfg.DATA.VAL_DIR = "val"
    cfg.DATA.AUGMENT = "imagenet"  # imagenet (the recipe below) | crop_flip (CIFAR's "+") | none
    cfg.DATA.IMAGE_SIZE = 224
    cfg.DATA.CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's range of crop areas
    cfg.DATA.VAL_RESIZE = 256
    cfg.DATA.MEAN = IMAGENET_MEAN
    cfg.DATA.STD = IMAGENET_STD
    cfg.DATA.COLOR_JITTER = 0.4  # brightness, contrast and saturation
    cfg.DATA.LIGHTING_STD = 0.1  # AlexNet-style PCA lighting noise
    cfg.DATA.NUM_WORKERS = 8  # per process
    # pil: decode and augment in the loader workers | device: the workers read bytes, the training
    # device decodes and augments the batch (ImageFolder with the imagenet augmentation)
    cfg.DATA.BACKEND = "pil"
    cfg.DATA.MAX_BAD_IMAGE_RETRIES = 10  # unreadable images replaced in a row before giving up

    cfg.MIX = CN()
    cfg.MIX.NAME = "none"  # none | cutout | mixup | cutmix | saliencymix
    cfg.MIX.PROB = 1.0
    cfg.MIX.ALPHA = 1.0  # the Beta distribution's parameter
    cfg.MIX.LABEL_SMOOTHING = 0.0
    cfg.MIX.CUTOUT_SIZE = 0.5  # side as a fraction of the shorter image side (112 of 224)
    cfg.MIX.SALIENCY = "fine_grained"  # fine_grained | spectral_residual | frequency_tuned
    cfg.MIX.BACKEND = "torch"  # torch (batched, on the GPU) | opencv (per image, the reference)
    cfg.MIX.BOX = "batch"  # batch (one box from the first source, as the official code) | sample
    cfg.MIX.STRATEGY = "sal2corr"  # sal2corr | sal2sal | sal2nonsal | nonsal2sal | nonsal2nonsal | center2center
    # pixels (de-normalised with DATA.MEAN/STD: as the paper describes) | input (the tensor as given,
    # clipped to [0, 1]) | official (the tensor as the official code hands it to OpenCV, fine_grained
    # only: with BOX batch and STRATEGY sal2corr, the published box exactly)
    cfg.MIX.SALIENCY_ON = "pixels"

    cfg.SOLVER = CN()
    cfg.SOLVER.EPOCHS = 300
    cfg.SOLVER.MAX_ITER = 0  # > 0: stop after this many iterations (the schedule still spans EPOCHS)
    cfg.SOLVER.BATCH_SIZE = 256  # total over all processes
    cfg.SOLVER.BASE_LR = 0.1  # for a total batch of 256, scaled linearly with BATCH_SIZE
    # The classifier (model.fc) learns at this times the lr. 1.0 in the paper's recipe; below 1 where few
    # classes and small batches make its bias chase each batch's label mix (the demo: 5 classes, batch 32).
    cfg.SOLVER.HEAD_LR_FACTOR = 1.0
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.NESTEROV = False
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.SCHEDULE = "step"  # step | cosine
    cfg.SOLVER.STEP_EPOCHS = (75, 150, 225)
    cfg.SOLVER.GAMMA = 0.1
    cfg.SOLVER.WARMUP_EPOCHS = 0.0
    cfg.SOLVER.WARMUP_FACTOR = 0.1  # lr multiplier at the start of the warmup
    cfg.SOLVER.AMP = True  # mixed precision on CUDA, and bfloat16 on CPUs that compute in it natively
    cfg.SOLVER.AMP_DTYPE = "bfloat16"  # bfloat16 | float16 (float16 uses a grad scaler)

    cfg.CHECKPOINT = CN()
    # A resumable checkpoint (weights, SGD momentum, random states) every PERIOD_MINUTES of training
    # (rank 0's clock), and every PERIOD iterations and at each epoch end when asked; always at the
    # end and when SLURM stops the job (helpers/preemption.py). 0: not by that measure.
    cfg.CHECKPOINT.PERIOD_MINUTES = 30.0
    cfg.CHECKPOINT.PERIOD = 0
    cfg.CHECKPOINT.EPOCH_END = False
    cfg.CHECKPOINT.KEEP_LAST = 3

    cfg.TEST = CN()
    cfg.TEST.EVAL_PERIOD = 1  # epochs; 0 evaluates only at the end
    cfg.TEST.BATCH_SIZE = 256  # total over all processes
    return cfg
