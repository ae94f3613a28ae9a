"""Every config key comformer adds to detectron2's defaults, one comment each."""

from detectron2.config import CfgNode as CN

__all__ = ["add_comformer_config"]


def add_comformer_config(cfg: CN) -> None:
    """Add comformer's keys (model, data, solver, continual) to a detectron2 config in place."""
    # ---------------------------------------------------------------- data
    # Dataset mapper used by the trainer, by name in MAPPER_REGISTRY ("" = chosen from the dataset's
    # evaluator_type: panoptic datasets use the panoptic mapper, semantic ones the semantic mapper).
    cfg.INPUT.DATASET_MAPPER_NAME = ""
    # Colour augmentation (brightness/contrast/saturation/lighting jitter) in training.
    cfg.INPUT.COLOR_AUG_SSD = False
    # Max fraction of the crop a single category may cover (detectron2's category-area constraint).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Pad training images to this square size (-1: no padding beyond the size divisibility).
    cfg.INPUT.SIZE_DIVISIBILITY = -1

    # ---------------------------------------------------------------- your own dataset
    # (comformer/data/datasets/register_custom.py; the README's "Your own data")
    cfg.DATASETS.CUSTOM = CN()
    # Registers the datasets <NAME>_train and <NAME>_val when the config is loaded ("": none); use
    # them in DATASETS.TRAIN / DATASETS.TEST.
    cfg.DATASETS.CUSTOM.NAME = ""
    # "panoptic": COCO panoptic json + PNGs, classes from the json's categories; "semantic": label
    # PNGs (class index per pixel, 255 void), classes from CLASSES or CLASSES_FILE.
    cfg.DATASETS.CUSTOM.KIND = "panoptic"
    # Folder of the dataset (relative: under $DETECTRON2_DATASETS); the paths below are under it.
    cfg.DATASETS.CUSTOM.ROOT = ""
    # Files of each split: IMAGES folder ("" skips the split), PANOPTIC_JSON and PANOPTIC_PNGS
    # (panoptic), SEM_SEG folder of label maps named like the PNGs or the images (required for
    # "semantic"; "" for "panoptic" derives them from the PNGs).
    cfg.DATASETS.CUSTOM.TRAIN = CN()
    cfg.DATASETS.CUSTOM.TRAIN.IMAGES = "images/train"
    cfg.DATASETS.CUSTOM.TRAIN.PANOPTIC_JSON = "panoptic_train.json"
    cfg.DATASETS.CUSTOM.TRAIN.PANOPTIC_PNGS = "panoptic_train"
    cfg.DATASETS.CUSTOM.TRAIN.SEM_SEG = ""
    cfg.DATASETS.CUSTOM.VAL = CN()
    cfg.DATASETS.CUSTOM.VAL.IMAGES = "images/val"
    cfg.DATASETS.CUSTOM.VAL.PANOPTIC_JSON = "panoptic_val.json"
    cfg.DATASETS.CUSTOM.VAL.PANOPTIC_PNGS = "panoptic_val"
    cfg.DATASETS.CUSTOM.VAL.SEM_SEG = ""
    # Semantic: the class names in label order, as a list or a text file (one name per line).
    cfg.DATASETS.CUSTOM.CLASSES = []
    cfg.DATASETS.CUSTOM.CLASSES_FILE = ""
    # Semantic: extension of the images (label maps are <image stem>.png).
    cfg.DATASETS.CUSTOM.IMAGE_EXT = ".jpg"
    # Semantic: id of a background class, as Pascal VOC's 0 (see CONT.BACKGROUND); -1: none.
    cfg.DATASETS.CUSTOM.BACKGROUND_CLASS = -1
    # Decode every file once at the first load to check it (remembered in $COMFORMER_CACHE until a
    # file changes); False: only the checks made without decoding, the rest at training time.
    cfg.DATASETS.CUSTOM.CHECK_FILES = True

    # ---------------------------------------------------------------- solver
    # Weight decay of nn.Embedding weights (the transformer decoder's query features, query
    # positions and level embedding), as Mask2Former's trainer applies it.
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Optimizer name: "ADAMW" or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Learning-rate multiplier for the backbone's parameters.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1

    # ---------------------------------------------------------------- mask former
    # Every key Mask2Former's add_maskformer2_config defines exists here with its default and its
    # meaning, so that a yaml file both can read builds the same model (tests/
    # test_mask2former_parity.py compares with the official config). Mask2Former's defaults are
    # MaskFormer's in places (a "res5" decoder input, the FPN pixel decoder): model yaml files set
    # these keys, as configs/ and Mask2Former's own do.
    cfg.MODEL.MASK_FORMER = CN()
    # Loss weights: deep supervision on every decoder layer, no-object class weight, class/dice/mask.
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 20.0
    # Transformer decoder: name in TRANSFORMER_DECODER_REGISTRY and its sizes.
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    # Feature fed to the transformer decoder; MaskFormerHead supports "multi_scale_pixel_decoder"
    # (the pixel decoder's 3 coarsest levels) only.
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res5"
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    # Attention heads of the transformer decoder AND of the pixel decoder's deformable encoder.
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    # Dropout of the pixel decoder's deformable encoder (the transformer decoder has none).
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.1
    # Feed-forward width of the transformer decoder layers.
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    # Decoder predictions: the masked-attention layers + the one from the learnable queries
    # (Mask2Former's models: 10 = 9 layers + 1).
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 6
    # Apply LayerNorm before (True) or after (False) attention/FFN in the decoder layers.
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    # Give the decoder a 1x1 input projection per level even when CONVS_DIM == HIDDEN_DIM.
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    # Images are padded to a multiple of this; -1: the backbone's size divisibility; 0: no padding
    # beyond the batch's largest image (Mask2Former's meanings).
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32
    # comformer extension: mask normalisation, "sigmoid" (Mask2Former: each mask independent) or
    # "softmax" (CoMFormer: a softmax across queries per pixel) in matching, losses and inference.
    cfg.MODEL.MASK_FORMER.MASK_ACTIVATION = "sigmoid"
    # Class scores at inference: "softmax" over the K+1 logits (Mask2Former) or "sigmoid" per
    # logit, no-object included (ECLIPSE's classifier, trained with a sigmoid focal loss).
    cfg.MODEL.MASK_FORMER.CLASS_ACTIVATION = "softmax"
    # Per-pixel head instead of mask classification (semantic segmentation only): a 1x1 classifier
    # on the pixel decoder's mask features, per-pixel cross-entropy (modeling/per_pixel.py).
    cfg.MODEL.MASK_FORMER.PER_PIXEL = False
    # Point-sampled mask losses: points per mask, oversampling ratio, fraction chosen by uncertainty.
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 112 * 112
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75

    cfg.MODEL.MASK_FORMER.TEST = CN()
    # Which outputs inference produces.
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    # Panoptic: queries whose class score is not above this are dropped; a segment whose visible
    # part is less than this fraction of its mask is dropped.
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.0
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.0
    # Post-process semantic output before resizing it back to the input size.
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # -1: Mask2Former's semantic inference. c >= 0: the dataset's background class c is no-object
    # for the model; pixels outside every panoptic-style segment are c (CoMFormer's inference on
    # datasets with a background class). Continual steps set it (CONT.BACKGROUND).
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_BACKGROUND_CLASS = -1

    # ---------------------------------------------------------------- pixel decoder
    # (cfg.MODEL.SEM_SEG_HEAD exists in detectron2; these keys extend it.)
    # Dimension of the per-pixel mask embeddings the queries are dotted with.
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    # Pixel decoder: name in PIXEL_DECODER_REGISTRY.
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "BasePixelDecoder"
    # Backbone features the deformable-attention encoder attends over.
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    # Layers of the deformable-attention encoder.
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 0
    # comformer extension: feed-forward width of the deformable encoder's layers (Mask2Former fixes
    # it at 1024, the default).
    cfg.MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD = 1024
    # comformer extension: how deformable attention samples: "pytorch" (the reference),
    # "compiled" (torch.compile; Triton kernels on CUDA, nothing to build), "auto" (compiled on
    # CUDA, pytorch elsewhere). Same numbers within float32 rounding.
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL = "auto"

    # ---------------------------------------------------------------- Mask2Former's unread keys
    # Keys Mask2Former defines but never reads for its models (or reads only in a data mapper
    # comformer does not have). They exist so that Mask2Former's yaml files merge, and mean here
    # what they mean there: nothing.
    # Read by no Mask2Former model: the deformable encoder has MASK_FORMER.NHEADS heads and 4
    # sampling points (the pixel decoder warns when these say otherwise).
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    # Transformer encoder layers of MaskFormer's (v1) decoder, which Mask2Former models do not use.
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 0
    # Large-scale jitter of Mask2Former's COCO mappers (configs/coco approximates it with
    # detectron2's resize and crop keys instead).
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    # ---------------------------------------------------------------- swin backbone
    cfg.MODEL.SWIN = CN()
    # Sizes of Swin-T (other variants set EMBED_DIM, DEPTHS, NUM_HEADS in their yaml).
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.QK_SCALE = None
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.PATCH_NORM = True
    # Stages returned, named res2..res5 like detectron2's ResNets.
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Gradient checkpointing inside Swin blocks (saves memory at the cost of recomputation).
    cfg.MODEL.SWIN.USE_CHECKPOINT = False

    # ---------------------------------------------------------------- continual scenario
    cfg.CONT = CN()
    # Task as "<base>-<increment>" (e.g. "100-10"): base classes first, then increments until every
    # class of DATASETS.TRAIN[0] is learned. Empty with STEP_CLASSES empty: not a continual run.
    cfg.CONT.TASK = ""
    # Explicit class ids per step instead of TASK, e.g. [[0, 1, 2], [3], [4, 5]] (fixes the order).
    cfg.CONT.STEP_CLASSES = []
    # Class order for TASK: dataset order by default; or the class ids in order (ORDER), or a file of
    # whitespace-separated class ids (ORDER_FILE), or a random order from this seed (ORDER_SEED >= 0).
    cfg.CONT.ORDER = []
    cfg.CONT.ORDER_FILE = ""
    cfg.CONT.ORDER_SEED = -1
    # "overlap": a step's images may show future classes (unlabelled); "disjoint": such images dropped.
    cfg.CONT.MODE = "overlap"
    # Step to run (-1: every step of the scenario, skipping finished ones).
    cfg.CONT.STEP = -1
    # Continual method, by name in the method registry (ft, joint, ...).
    cfg.CONT.METHOD = "ft"
    # On a dataset with a background class (metadata background_class, e.g. VOC): "class": the
    # background is a class of the model, learned at step 0, and the pixels of old and future
    # classes are labelled background (MiB's convention, per-pixel heads); "no-object": the model
    # does not predict it, its pixels and those of other steps' classes have no target, and
    # semantic inference calls uncovered pixels background (CoMFormer's convention for mask
    # classification); "auto": "class" for a per-pixel head, else "no-object".
    cfg.CONT.BACKGROUND = "auto"
    # Iterations of an incremental step: INC_ITERS_PER_CLASS x new classes when > 0, else INC_MAX_ITER,
    # else SOLVER.MAX_ITER (which always sets the base step's iterations).
    cfg.CONT.INC_ITERS_PER_CLASS = 0
    cfg.CONT.INC_MAX_ITER = -1
    # Base learning rate of incremental steps (-1: SOLVER.BASE_LR).
    cfg.CONT.INC_BASE_LR = -1.0
    # Milestones of a multi-step schedule (SOLVER.STEPS) in incremental steps, as fractions of the
    # increment's iterations: None scales the base's SOLVER.STEPS to the increment's length (a
    # milestone at 5/6 of the base step falls at 5/6 of each increment); [] keeps the rate constant.
    # SOLVER.STEPS counts the base step's iterations, so it cannot be reused as it is.
    cfg.CONT.INC_LR_STEPS = None
    # A finished step-0 checkpoint to start from instead of training the base step.
    cfg.CONT.BASE_WEIGHTS = ""
    # Keep the classifier rows of old classes fixed during incremental steps.
    cfg.CONT.FREEZE_OLD_CLASSIFIER = False
    # Validation images drawn after each step as image | ground truth | prediction, old and new
    # classes outlined differently (OUTPUT_DIR/step<t>/vis).
    cfg.CONT.VIS_IMAGES = 4

    # ---------------------------------------------------------------- continual methods
    # MiB (CONT.METHOD mib), each component switchable for ablations.
    cfg.CONT.MIB = CN()
    # Unbiased cross-entropy: the background (no-object, or the per-pixel head's background class)
    # stands for "background or an old class".
    cfg.CONT.MIB.UNBIASED_CE = True
    # Unbiased distillation: the teacher's background is matched by the student's "background or
    # new class".
    cfg.CONT.MIB.UNBIASED_KD = True
    # New classes start from the background classifier row, sharing its probability.
    cfg.CONT.MIB.INIT = True
    # Distillation weight; < 0: MiB's 10 on the per-pixel head (its argparser.py), CoMFormer's 200
    # on mask classification (its README).
    cfg.CONT.MIB.KD_WEIGHT = -1.0
    # The teacher's logits are divided by this before its softmax.
    cfg.CONT.MIB.KD_TEMPERATURE = 1.0

    # CoMFormer (CONT.METHOD comformer), each component switchable for ablations.
    cfg.CONT.COMFORMER = CN()
    # Softmax masks: requires MODEL.MASK_FORMER.MASK_ACTIVATION "softmax" (False: sigmoid ablation).
    cfg.CONT.COMFORMER.SOFTMAX_MASKS = True
    # Focal classification loss alpha * (1 - p_t)^gamma * CE instead of the weighted cross-entropy.
    cfg.CONT.COMFORMER.FOCAL = True
    # The focal loss's factor alpha.
    cfg.CONT.COMFORMER.FOCAL_ALPHA = 5.0
    # The focal loss's exponent gamma.
    cfg.CONT.COMFORMER.FOCAL_GAMMA = 1.0
    # Unbiased distillation (False: the new classes are dropped from the student's distribution).
    cfg.CONT.COMFORMER.UNBIASED_KD = True
    # Distillation weight; < 0: by dataset, kind and task (SETTING_DEFAULTS in continual/defaults.py).
    cfg.CONT.COMFORMER.KD_WEIGHT = -1.0
    # Weigh each query's distillation by (1 - teacher's no-object probability)^2.
    cfg.CONT.COMFORMER.KD_REWEIGHT = True
    # Distil the auxiliary (deep supervision) predictions too, with the same weight.
    cfg.CONT.COMFORMER.KD_AUX = False
    # The teacher's logits are divided by this before its softmax.
    cfg.CONT.COMFORMER.KD_TEMPERATURE = 1.0
    # Mask-based pseudo-labels of the old classes from the teacher join the ground truth.
    cfg.CONT.COMFORMER.PSEUDO_LABELS = True
    # Teacher queries whose class score is not above this give no pseudo-label (strict, as the
    # official code).
    cfg.CONT.COMFORMER.PSEUDO_THRESHOLD = 0.0

    # PLOP (CONT.METHOD plop): two variants (continual/plop.py); each key below left at its
    # "variant's" value ("", < 0, None) takes the variant's choice.
    cfg.CONT.PLOP = CN()
    # "plop" (PLOP's code), "comformer" (CoMFormer's port); "": "plop" on the per-pixel head,
    # "comformer" on mask classification.
    cfg.CONT.PLOP.VARIANT = ""
    # Local POD weight of the feature maps; < 0: the variant's (plop: 0.01, ADE20K 0.001;
    # comformer: 0.001); 0: no POD on features.
    cfg.CONT.PLOP.POD_WEIGHT = -1.0
    # Local POD weight of the per-pixel logits; < 0: the variant's (plop: 0.0005, ADE20K 0.00001;
    # comformer: 0).
    cfg.CONT.PLOP.POD_LOGITS_WEIGHT = -1.0
    # POD factor: "plop" sqrt(classes seen / new classes), "comformer" sqrt(new / seen); "": the
    # variant's.
    cfg.CONT.PLOP.POD_FACTOR = ""
    # Square the maps before POD's pooling (PLOP's code); None: the variant's (plop: True).
    cfg.CONT.PLOP.POD_SQUARE = None
    # Features distilled by POD: backbone outputs by name, and "mask_features" (pixel decoder).
    cfg.CONT.PLOP.POD_FEATURES = ["res2", "res3", "res4", "res5", "mask_features"]
    # POD window grids: each feature map is cut into s x s windows for every s.
    cfg.CONT.PLOP.POD_SCALES = [1, 2, 4]
    # Pseudo-labels of the old classes: "mask" (CoMFormer's, mask classification), "entropy"
    # (PLOP's) or "none"; "": the variant's (comformer on mask classification: mask; else entropy).
    cfg.CONT.PLOP.PSEUDO_LABELS = ""
    # "mask" pseudo-labels: teacher queries whose class score is not above this give none.
    cfg.CONT.PLOP.PSEUDO_THRESHOLD = 0.0
    # "entropy" pseudo-labels: lowest per-class threshold on the uncertainty (the normalised entropy;
    # PLOP's own scaling on the per-pixel head, see continual/plop.py).
    cfg.CONT.PLOP.ENTROPY_THRESHOLD = 0.001
    # "entropy" thresholds: "plop" (PLOP's histogram "median" over the step's training set, before
    # the step), "fine" (the median from a fine histogram of the same pass), "batch" (per-batch
    # medians); "": plop on the per-pixel head with the plop variant, else batch.
    cfg.CONT.PLOP.ENTROPY_MEDIAN = ""
    # Per-pixel head: scale each image's cross-entropy by its share of confident background
    # pixels (PLOP's classif_adaptive_factor); None: the variant's (plop: True).
    cfg.CONT.PLOP.ADAPTIVE_FACTOR = None
    # Initialise the new classes as MiB does (PLOP's init_balanced); None: the variant's (plop:
    # True).
    cfg.CONT.PLOP.INIT = None

    # ECLIPSE (CONT.METHOD eclipse): the model trained before is frozen; each increment learns
    # prompt queries with their own heads (continual/eclipse.py). Needs
    # MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME "EclipseTransformerDecoder" and CLASS_ACTIVATION
    # "sigmoid" for every step, base included (the *-eclipse.yaml configs).
    cfg.CONT.ECLIPSE = CN()
    # Prompt queries per increment; < 0: by setting (SETTING_DEFAULTS in continual/defaults.py).
    cfg.CONT.ECLIPSE.NUM_PROMPTS = -1
    # Deep prompts: a positional embedding per decoder layer (False: one for all layers, shallow).
    cfg.CONT.ECLIPSE.DEEP_PROMPTS = True
    # Each increment's prompts get their own mask-embedding MLP (False: the base's, frozen).
    cfg.CONT.ECLIPSE.PROMPT_MASK_MLP = True
    # Each step's classifier (and no-object's) is a 3-layer MLP (False: a linear layer).
    cfg.CONT.ECLIPSE.DEEP_CLS = True
    # How a step's prompts and new class rows start: "eclipse-code" (clovaai/ECLIPSE: identical
    # prompts at the mean base query, identical copies of no-object's row; slow to part on short
    # schedules) or "distinct" (prompt i as base query i*Q/P; rows no-object's plus their random
    # init; README "ECLIPSE in this library").
    cfg.CONT.ECLIPSE.INIT = "eclipse-code"
    # Train the shared no-object classifier in increments, as clovaai/ECLIPSE's code does (False:
    # frozen with the rest of the model, as the paper describes).
    cfg.CONT.ECLIPSE.TRAIN_NO_OBJECT = False
    # Logit manipulation of each query group's no-object logit at inference (False: the ablation;
    # other steps' class logits are still switched off).
    cfg.CONT.ECLIPSE.LOGIT_MANIPULATION = True
    # Deltas of the manipulation, one per query group (base first), the last repeated; []: by
    # setting (base group, increments).
    cfg.CONT.ECLIPSE.LOGIT_DELTAS = []
    # Sigmoid focal classification loss of every step: its factor alpha ...
    cfg.CONT.ECLIPSE.FOCAL_ALPHA = 5.0
    # ... and its exponent gamma.
    cfg.CONT.ECLIPSE.FOCAL_GAMMA = 1.0
    # MODEL.MASK_FORMER.CLASS_WEIGHT of increments; < 0: by setting.
    cfg.CONT.ECLIPSE.INC_CLASS_WEIGHT = -1.0
    # Iterations of an increment; < 0: by setting, else the engine's (CONT.INC_ITERS_PER_CLASS...).
    cfg.CONT.ECLIPSE.INC_MAX_ITER = -1
    # Learning rate of an increment; < 0: by setting, else CONT.INC_BASE_LR's.
    cfg.CONT.ECLIPSE.INC_BASE_LR = -1.0

    # ---------------------------------------------------------------- data loading
    # Training batches each loader worker keeps ready (with DATALOADER.NUM_WORKERS > 0). torch's
    # default of 2 *samples* per worker is less than one batch when batches are grouped by aspect
    # ratio (samples are then loaded one by one), which left the step waiting for data.
    cfg.DATALOADER.PREFETCH_BATCHES = 2
    # How loader workers hand tensors to the training process (torch.multiprocessing sharing
    # strategy, set for the whole process when NUM_WORKERS > 0; "" keeps torch's default,
    # file_descriptor on Linux). file_system is faster for samples made of many small mask tensors
    # (data wait 7.1% -> 1.7% of a CPU step in bench/train_step.py); torch's shared-memory manager
    # removes the files when the processes end.
    cfg.DATALOADER.SHARING_STRATEGY = "file_system"

    # ---------------------------------------------------------------- reliability
    # A training sample whose files cannot be decoded or whose annotation contradicts them (sizes,
    # PNG segment ids vs segments_info, class ids) is skipped with a warning and counted (log,
    # metrics, results) instead of stopping training with an error naming the file.
    cfg.INPUT.SKIP_BAD_SAMPLES = False
    # Deterministic mode: torch.use_deterministic_algorithms, cuDNN benchmark off, and training
    # batches of consecutive samples (no aspect-ratio grouping), so that with SEED >= 0 a killed and
    # resumed run repeats the uninterrupted one.
    cfg.DETERMINISTIC = False
