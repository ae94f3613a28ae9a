"""ECLIPSE (CONT.METHOD eclipse): logit manipulation and loss by hand, settings, the frozen model
(bit for bit), old query groups undisturbed by a step, and a two-step run killed and resumed."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detectron2.modeling import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_methods import _batch, _cfg  # noqa: E402
from test_resume import REPO, _state, _tail, driver_env, tiny_command, write_driver  # noqa: E402

from comformer.continual import (  # noqa: E402
    build_continual_model,
    build_method,
    class_embed,
    grow_classifier_state_dict,
)
from comformer.continual.eclipse import SigmoidFocalLoss, manipulate_logits  # noqa: E402
from comformer.data.scenario import build_scenario  # noqa: E402
from comformer.engine.step_config import step_config, step_iterations  # noqa: E402
from comformer.engine.step_trainer import FreezeOldClassesHook  # noqa: E402
from comformer.engine.trainer import build_optimizer  # noqa: E402

ECLIPSE = [
    "CONT.METHOD", "eclipse",
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "EclipseTransformerDecoder",
    "MODEL.MASK_FORMER.CLASS_ACTIVATION", "sigmoid",
]  # fmt: skip
TINY = [
    "MODEL.MASK_FORMER.DEC_LAYERS", 3,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 6,
    "CONT.ECLIPSE.NUM_PROMPTS", 4,
    "SOLVER.WEIGHT_DECAY", 0.05,
]  # fmt: skip


def _logit(p):
    return math.log(p / (1 - p))


# ------------------------------------------------------------------------------ by hand
def test_logit_manipulation_by_hand():
    # groups: 1 base query (classes 0, 1), 1 prompt (class 2); logits [c0, c1, c2, no-object]
    logits = torch.tensor([[[_logit(0.6), _logit(0.3), _logit(0.5), 0.7],
                            [_logit(0.2), _logit(0.1), _logit(0.9), -0.3]]])  # fmt: skip
    out = manipulate_logits(logits, [1, 1], [2, 1], [0.4, 0.5])
    # base query: other classes {2}: no-object = logit(0.4 * 0.5); class 2 switched off
    torch.testing.assert_close(
        out[0, 0], torch.tensor([_logit(0.6), _logit(0.3), -10.0, _logit(0.2)])
    )
    # prompt: others {0, 1}: sigmoids sum to 0.3 -> no-object logit(0.5 * 0.3)
    torch.testing.assert_close(out[0, 1], torch.tensor([-10.0, -10.0, _logit(0.9), _logit(0.15)]))
    # the sum of the other sigmoids is clamped to 1; a negative delta scales no-object's own
    # sigmoid; probabilities are clamped to [0.001, 0.999]
    logits = torch.tensor([[[_logit(0.9), _logit(0.8), 0.0, _logit(0.5)],
                            [_logit(0.2), _logit(0.1), 0.0, _logit(0.5)]]])  # fmt: skip
    out = manipulate_logits(logits, [1, 1], [2, 1], [0.0, -0.6])
    assert out[0, 0, -1] == logits[0, 0, -1]  # delta 0: no-object untouched, others still off
    assert out[0, 0, 2] == -10.0
    torch.testing.assert_close(out[0, 1, -1], torch.tensor(_logit(0.3)))
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [_logit(0.9), _logit(0.8), 0.0, 0.0]]])
    out = manipulate_logits(logits, [1, 1], [2, 1], [0.001, 0.5])
    # base query: others {2}, sigmoid(0) = 0.5: 0.001 * 0.5 is clamped up to 0.001
    torch.testing.assert_close(out[0, 0, -1], torch.tensor(_logit(0.001)))
    # prompt: others {0, 1}: 0.9 + 0.8 clamped to 1: 0.5 * 1
    torch.testing.assert_close(out[0, 1, -1], torch.tensor(0.0))
    # the ablation: no-object left alone, other steps' classes still off
    off = manipulate_logits(logits, [1, 1], [2, 1], [1.0, 0.5], manipulate=False)
    assert torch.equal(off[..., -1], logits[..., -1]) and off[0, 1, 0] == -10.0
    with pytest.raises(ValueError, match="one each per step"):
        manipulate_logits(logits, [1, 1], [2, 1], [0.5])


def test_sigmoid_focal_loss_by_hand():
    loss = SigmoidFocalLoss(alpha=5.0, gamma=1.0)
    # one query, K = 1: logits [class 0, no-object] = [0, 0], target class 0
    value = loss(torch.zeros(1, 1, 2), torch.tensor([[0]]), torch.ones(2))
    # each entry: BCE log 2, p_t 0.5: 5 * log 2 * 0.5, mean over the 2 entries, times 50
    torch.testing.assert_close(value, torch.tensor(50 * 5 * math.log(2) * 0.5))
    # a confident right answer costs little
    sure = loss(torch.tensor([[[8.0, -8.0]]]), torch.tensor([[0]]), torch.ones(2))
    assert sure < 1e-3
    with pytest.raises(ValueError, match="FOCAL_ALPHA"):
        SigmoidFocalLoss(alpha=0.0)


# ------------------------------------------------------------------------------ settings
def test_settings_by_setting_and_config_errors():
    from comformer.continual.defaults import setting_default, setting_value

    ade_ps = "ade20k_panoptic_train"
    assert setting_default("CONT.ECLIPSE.NUM_PROMPTS", -1, ade_ps, "100-50") == 50
    assert setting_default("CONT.ECLIPSE.INC_MAX_ITER", -1, ade_ps, "100-10") == 16000
    assert (
        setting_default("CONT.ECLIPSE.INC_BASE_LR", -1, "ade20k_semantic_train", "100-10") == 1e-3
    )
    assert setting_value("CONT.ECLIPSE.LOGIT_DELTAS[1:]", ade_ps, "100-50") == -0.6
    assert setting_default("CONT.ECLIPSE.INC_MAX_ITER", -1, ade_ps, "7-7") == -1  # the engine's

    cfg = _cfg(*ECLIPSE, *TINY)
    scenario = build_scenario(cfg)
    method = build_method(cfg, scenario, 1)
    assert method.settings.deltas == (0.4, 0.5) and method.settings.num_prompts == 4
    assert method.keeps_old_classifier and method.keeps_no_object_row
    # synthetic data has no row: class weight 10 (every script), the engine's iterations / lr
    cfg1 = step_config(cfg, scenario, 1)
    assert cfg1.MODEL.MASK_FORMER.CLASS_WEIGHT == 10.0
    assert cfg1.SOLVER.MAX_ITER == step_iterations(cfg, scenario, 1) == cfg.SOLVER.MAX_ITER
    cfg_it = _cfg(*ECLIPSE, *TINY, "CONT.ECLIPSE.INC_MAX_ITER", 7, "CONT.ECLIPSE.INC_BASE_LR", 0.1)
    cfg1 = step_config(cfg_it, scenario, 1)
    assert (cfg1.SOLVER.MAX_ITER, cfg1.SOLVER.BASE_LR) == (7, 0.1)
    assert step_iterations(cfg_it, scenario, 1) == 7
    assert step_config(cfg_it, scenario, 0).SOLVER.MAX_ITER == cfg.SOLVER.MAX_ITER
    # its base is not Mask2Former's
    ft = build_method(_cfg(), scenario, 0)
    assert method.base_key() != ft.base_key()

    with pytest.raises(
        ValueError, match="TRANSFORMER_DECODER_NAME='MultiScaleMaskedTransformerDecoder'"
    ):
        build_method(_cfg("CONT.METHOD", "eclipse"), scenario, 0)
    bad = _cfg(*ECLIPSE, "CONT.ECLIPSE.LOGIT_DELTAS", [0.5, 2.0])
    with pytest.raises(ValueError, match=r"CONT.ECLIPSE.LOGIT_DELTAS=\[0.5, 2.0\]"):
        build_method(bad, scenario, 0)
    with pytest.raises(ValueError, match="NUM_PROMPTS=0"):
        build_method(_cfg(*ECLIPSE, "CONT.ECLIPSE.NUM_PROMPTS", 0), scenario, 0)
    with pytest.raises(ValueError, match="CONT.ECLIPSE.INIT='mean'"):
        build_method(_cfg(*ECLIPSE, "CONT.ECLIPSE.INIT", "mean"), scenario, 0)
    with pytest.raises(ValueError, match="CLASS_ACTIVATION='tanh'"):
        build_model(step_config(_cfg("MODEL.MASK_FORMER.CLASS_ACTIVATION", "tanh"), scenario, 0))


# ------------------------------------------------------------------------------ the step
def _base_batch():
    batch = _batch()
    for x in batch:
        x["instances"].gt_classes -= 10  # base classes 0..9
    return batch


def _two_steps(*opts):
    """A trained-looking step-0 model and the step-1 model started from it, as the step trainer
    starts a step."""
    torch.manual_seed(0)
    cfg = _cfg(*ECLIPSE, *TINY, *opts)
    scenario = build_scenario(cfg)
    cfg0, cfg1 = step_config(cfg, scenario, 0), step_config(cfg, scenario, 1)
    model0 = build_continual_model(cfg0, scenario, 0, build_method(cfg0, scenario, 0))
    optimizer = build_optimizer(cfg0, model0.student)
    model0.train()
    for _ in range(2):  # a couple of base steps, so running statistics are not the defaults
        sum(model0(_base_batch()).values()).backward()
        optimizer.step()
        optimizer.zero_grad()
    previous = {k: v.clone() for k, v in model0.student.state_dict().items()}
    method = build_method(cfg1, scenario, 1)
    model1 = build_continual_model(cfg1, scenario, 1, method)
    student = model1.student
    state = grow_classifier_state_dict(
        previous, student.state_dict(), 10, 1, added_keys=method.added_state_keys(student)
    )
    student.load_state_dict(state)
    method.init_new_classes(class_embed(student))
    method.init_new_step(student)
    return cfg1, model0, model1, previous


def test_step_trains_only_its_own_parameters_bit_for_bit():
    cfg1, _, model1, previous = _two_steps()
    student = model1.student
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    decoder = "sem_seg_head.predictor."
    assert trainable == {
        decoder + n
        for n in ["class_embed.weight", "class_embed.bias", "prompt_feat.0.weight",
                  "prompt_embed.0.0.weight", "prompt_embed.0.1.weight",
                  *[f"prompt_mask_embed.0.layers.{i}.{w}" for i in range(3) for w in ("weight", "bias")],
                  *[f"class_hidden.1.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]]
    }  # fmt: skip

    start = {k: v.clone() for k, v in student.state_dict().items()}
    hook = FreezeOldClassesHook(student, 10, no_object=True)
    hook.before_train()
    optimizer = build_optimizer(cfg1, student)  # AdamW with weight decay
    model1.train()
    for _ in range(3):
        sum(model1(_batch()).values()).backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.after_step()
    after = student.state_dict()
    for name, old in previous.items():
        new = after[name]
        if name in (
            "sem_seg_head.predictor.class_embed.weight",
            "sem_seg_head.predictor.class_embed.bias",
        ):
            assert torch.equal(new[:10], old[:10]) and torch.equal(new[-1], old[-1]), name
            assert not torch.equal(new[10:-1], after[name][-1:].expand_as(new[10:-1]))
        elif name != "criterion.empty_weight":  # a hyper-parameter (the step's config)
            assert torch.equal(new, old), name  # parameters and buffers (BN statistics) alike
    # ... and the step's own parameters did train
    added = [k for k in after if k not in previous]
    assert added and all(not torch.equal(after[k], start[k]) for k in added), added


def _start_of_step(*opts):
    """The step-1 student as the step starts, and its prompts' first predictions (train mode:
    the prompts alone) on a batch."""
    _, _, model1, _ = _two_steps(*opts)
    student = model1.student
    student.train()
    with torch.no_grad():
        _, out = student.predict(student.preprocess_images(_batch()))
    return student, out


def _pairwise_distinct(x):
    """Whether no two rows of x (N, ...) are equal."""
    x = x.flatten(1)
    return bool((torch.cdist(x, x) + torch.eye(len(x)) > 1e-6).all())


def test_step_prompts_and_new_classes_start_distinct():
    # Identical prompts predict the same mask and class in every image and identical class rows
    # the same logit for every new class: the synthetic_shapes 10-10 step then learned no new
    # class in 200 iterations (new PQ 2.1; 3.8 with distinct prompts; 8.1 with both distinct).
    student, out = _start_of_step("CONT.ECLIPSE.INIT", "distinct")
    p = student.sem_seg_head.predictor
    q = p.query_feat.weight.shape[0]  # 6 base queries, 4 prompts: base queries 0, 1, 3, 4
    rows = [i * q // 4 for i in range(4)]
    assert torch.equal(p.prompt_feat[0].weight, p.query_feat.weight[rows])
    for embed in p.prompt_embed[0]:  # one per decoder layer
        assert torch.equal(embed.weight, p.query_embed.weight[rows])
    weight = class_embed(student).weight
    assert _pairwise_distinct(weight[10:20])
    # near no-object's row: its random initialisation added (nn.Linear's, |w| <= 1/sqrt(C))
    assert (weight[10:20] - weight[-1]).abs().max() <= weight.shape[1] ** -0.5
    for b in range(out["pred_masks"].shape[0]):
        assert _pairwise_distinct(out["pred_masks"][b])
        assert _pairwise_distinct(out["pred_logits"][b, :, 10:20])
        assert _pairwise_distinct(out["pred_logits"][b, :, 10:20].transpose(0, 1))


def test_eclipse_code_init_starts_identical_prompts_and_classes():
    student, out = _start_of_step("CONT.ECLIPSE.INIT", "eclipse-code")
    p = student.sem_seg_head.predictor
    mean = p.query_feat.weight.mean(0).expand(4, -1)
    torch.testing.assert_close(p.prompt_feat[0].weight, mean)
    weight = class_embed(student).weight
    assert torch.equal(weight[10:20], weight[-1:].expand(10, -1))
    masks, logits = out["pred_masks"], out["pred_logits"]
    torch.testing.assert_close(masks, masks[:, :1].expand_as(masks))  # one mask for all prompts
    new = logits[..., 10:20]
    torch.testing.assert_close(new, new[..., :1].expand_as(new))  # one score for all classes


def test_old_query_groups_predict_what_the_previous_step_did():
    _, model0, model1, _ = _two_steps("CONT.ECLIPSE.LOGIT_MANIPULATION", False)
    # the step trains a little (so its prompts and heads are not a copy of the base ones)
    optimizer = torch.optim.SGD([p for p in model1.parameters() if p.requires_grad], lr=0.1)
    model1.train()
    sum(model1(_batch()).values()).backward()
    optimizer.step()
    model0.eval()
    model1.eval()
    images = model0.student.preprocess_images(_batch())
    with torch.no_grad():
        _, out0 = model0.student.predict(images)
        _, out1 = model1.student.predict(images)
        results0, results1 = model0(_batch()), model1(_batch())
    q = out0["pred_masks"].shape[1]
    assert out1["pred_masks"].shape[1] == q + 4  # base queries, then the step's 4 prompts
    # torch's nn.MultiheadAttention computes the cross-attention slightly differently (~1e-6)
    # when its weights require grad (the previous step's model as trained) and when they do not
    # (this step's, frozen): close to the trained model ...
    torch.testing.assert_close(out1["pred_masks"][:, :q], out0["pred_masks"], rtol=0, atol=1e-5)
    logits0, logits1 = out0["pred_logits"], out1["pred_logits"][:, :q]
    torch.testing.assert_close(logits1[..., :10], logits0[..., :10], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits1[..., -1], logits0[..., -1], rtol=0, atol=1e-5)
    # ... and bit for bit equal to it once it is frozen too
    for p in model0.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        _, out0 = model0.student.predict(images)
    assert torch.equal(out1["pred_masks"][:, :q], out0["pred_masks"])
    assert torch.equal(logits1[..., :10], out0["pred_logits"][..., :10])
    assert torch.equal(logits1[..., -1], out0["pred_logits"][..., -1])
    assert (logits1[..., 10:-1] == -10.0).all()  # the base queries say nothing of new classes
    assert (out1["pred_logits"][:, q:, :10] == -10.0).all()  # nor prompts of old ones
    for r0, r1 in zip(results0, results1):  # the same old-class segments on every image
        segments0 = [s["category_id"] for s in r0["panoptic_seg"][1]]
        old1 = [s["category_id"] for s in r1["panoptic_seg"][1] if s["category_id"] < 10]
        assert old1 == segments0


def test_other_methods_have_no_prompts():
    cfg = _cfg("CONT.METHOD", "comformer", "MODEL.MASK_FORMER.MASK_ACTIVATION", "softmax")
    scenario = build_scenario(cfg)
    keys = build_model(step_config(cfg, scenario, 1)).state_dict()
    assert not [k for k in keys if "prompt" in k or "hidden" in k]


# ------------------------------------------------------------------------------ kill and resume
def test_two_step_eclipse_scenario_resumes_after_a_kill(tmp_path):
    driver = write_driver(tmp_path)
    env = driver_env(tmp_path)
    opts = [
        *ECLIPSE, "CONT.STEP", -1, "CONT.ECLIPSE.NUM_PROMPTS", 3, "SOLVER.MAX_ITER", 2,
        "CONT.ECLIPSE.INC_MAX_ITER", 8, "SOLVER.CHECKPOINT_PERIOD", 2,
    ]  # fmt: skip
    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    logs = {name: tmp_path / f"{name}.log" for name in ("full", "killed", "resumed")}

    def start(out, log, resume=False):
        with open(log, "w") as f:
            return subprocess.Popen(
                tiny_command(driver, out, *opts, resume=resume),
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip

    full = start(full_out, logs["full"])
    killed = start(killed_out, logs["killed"])
    try:
        tag = killed_out / "step1/last_checkpoint"  # killed in step 1, after its 4th iteration
        deadline = time.time() + 300
        while killed.poll() is None and time.time() < deadline:
            if tag.exists() and tag.read_text() not in ("", "model_0000001.pth"):
                killed.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL, _tail(logs["killed"])
    assert not (killed_out / "step1/model_final.pth").exists()
    resumed = start(killed_out, logs["resumed"], resume=True)
    assert resumed.wait(timeout=600) == 0, _tail(logs["resumed"])
    assert full.wait(timeout=600) == 0, _tail(logs["full"])

    final_full = _state(full_out / "step1/model_final.pth")
    final_resumed = _state(killed_out / "step1/model_final.pth")
    assert final_full.keys() == final_resumed.keys()
    assert "sem_seg_head.predictor.prompt_feat.0.weight" in final_full  # the step's prompts
    different = [k for k in final_full if not torch.equal(final_full[k], final_resumed[k])]
    assert different == []
    # the base is untouched by step 1 (old classifier rows, no-object, everything else)
    base = _state(full_out / "step0/model_final.pth")
    for name, old in base.items():
        new = final_full[name]
        if name.endswith("class_embed.weight") or name.endswith("class_embed.bias"):
            assert torch.equal(new[:10], old[:10]) and torch.equal(new[-1], old[-1])
        elif name != "criterion.empty_weight":
            assert torch.equal(new, old), name
    rows_full = json.loads((full_out / "results.json").read_text())
    rows_resumed = json.loads((killed_out / "results.json").read_text())
    assert [r["step"] for r in rows_full] == [0, 1] and rows_full == rows_resumed


# ------------------------------------------------------------------------------ reference code
REFERENCE = Path(__file__).resolve().parent / "data" / "eclipse_reference"


def _from_reference_state(ref: dict, classes) -> dict:
    """clovaai/ECLIPSE decoder weights -> EclipseTransformerDecoder's: its per-step MLP
    classifiers (``class_embed.cls.0`` no-object, ``cls.s+1`` step s) become our hidden layers
    and rows of the one ``class_embed``."""
    out = {k: v for k, v in ref.items() if not k.startswith("class_embed.")}
    heads = [f"class_embed.cls.{s + 1}.layers" for s in range(len(classes))] + [
        "class_embed.cls.0.layers"
    ]
    names = [f"class_hidden.{s}" for s in range(len(classes))] + ["no_object_hidden"]
    for head, name in zip(heads, names):
        for i, j in ((0, 0), (1, 2)):
            out[f"{name}.{j}.weight"] = ref[f"{head}.{i}.weight"]
            out[f"{name}.{j}.bias"] = ref[f"{head}.{i}.bias"]
    out["class_embed.weight"] = torch.cat([ref[f"{h}.2.weight"] for h in heads])
    out["class_embed.bias"] = torch.cat([ref[f"{h}.2.bias"] for h in heads])
    return out


@pytest.mark.parametrize(
    "name, deep",
    [
        ("decoder_deltas_pos", True),
        ("decoder_deltas_neg", True),
        ("decoder_shallow_nodelta", False),
    ],
)
def test_inference_equals_the_reference_decoder(name, deep):
    """Three groups (5 base queries, two steps of 3 prompts, classes 4 + 3 + 2), deep classifiers,
    prompt mask MLPs: the same weights and inputs give clovaai/ECLIPSE's logits (after the logit
    manipulation) and masks."""
    from comformer.continual.eclipse import EclipseTransformerDecoder

    ref = torch.load(REFERENCE / f"{name}.pt", weights_only=True)
    classes = [4, 3, 2]
    decoder = EclipseTransformerDecoder(
        32, True, num_classes=9, hidden_dim=32, num_queries=5, nheads=4, dim_feedforward=64,
        dec_layers=3, pre_norm=False, mask_dim=16, enforce_input_project=False,
        step_classes=classes, num_prompts=3, deep_prompts=deep, prompt_mask_mlp=True,
        deep_cls=True, deltas=ref["deltas"],
    ).eval()  # fmt: skip
    decoder.load_state_dict(_from_reference_state(ref["state"], classes))
    with torch.no_grad():
        out = decoder(ref["x"], ref["mask_features"])
    torch.testing.assert_close(out["pred_masks"], ref["pred_masks"], rtol=0, atol=1e-4)
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], rtol=0, atol=1e-4)


def test_sigmoid_focal_loss_equals_the_reference():
    ref = torch.load(REFERENCE / "sigmoid_focal_loss.pt", weights_only=True)
    value = SigmoidFocalLoss(5.0, 1.0)(ref["logits"], ref["targets"], torch.ones(10))
    torch.testing.assert_close(value, ref["loss"])


def test_eclipse_trains_a_base_of_its_own_on_the_benchmark():
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    from comformer import add_comformer_config
    from comformer.engine.bases import base_owners

    sys.path.insert(0, str(REPO / "bench"))
    from continual_synthetic import METHODS, method_config

    assert "eclipse" in METHODS
    configs = {}
    for method in ("ft", "mib", "comformer", "eclipse"):
        cfg = get_cfg()
        add_deeplab_config(cfg)
        add_comformer_config(cfg)
        cfg.merge_from_file(str(method_config("shapes", "10-10", method)))
        cfg.merge_from_list(["CONT.METHOD", method])
        configs[method] = cfg
    owners = base_owners(configs)
    assert owners == {"comformer": "comformer", "eclipse": "eclipse", "ft": "ft", "mib": "ft"}
    # the step-0 losses alone already set it apart from a Mask2Former base of the same model
    scenario = build_scenario(configs["eclipse"])
    assert "sigmoid" in build_method(configs["eclipse"], scenario, 0).base_key()
