"""MS-CLIP: the released checkpoints' layout loads strictly through the teacher path; the demo
config trains, saves as fp16 safetensors and loads back.

The key lists in tests/data/msclip/ were read from the upstream code's own model with random
weights (see their README): every state_dict name, shape and dtype of the released MS-CLIP-S
files, with each norm's eps, each conv's stride, padding and groups, the shared tensors and the
intermediate shapes of a forward pass. No released weights are here, so outputs equal to the
upstream code's are not checked; names, shapes, settings, sharing and strict loading are.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError
from pipeline.msclip import MSCLIP, MSCLIP_CONFIGS, shared_names
from pipeline.teacher import build_model, load_teacher, parse_identity, teacher_identity
from stages.demo_teacher import save_weights
from tests.conftest import ROOT

KEY_LISTS = Path(__file__).parent / "data" / "msclip"
RELEASED = {"MS-CLIP-S-B-32": "b32-laion-msclips.keys.json", "MS-CLIP-S-B-16": "b16-yfcc-msclips.keys.json"}
DEMO_CONFIG = ROOT / "data" / "teachers" / "demo-msclip.json"
CAPTIONS = ["a red star on grass", "a blue circle", "two green squares", "a crane near water"]


@functools.cache
def key_list(model: str) -> dict:
    return json.loads((KEY_LISTS / RELEASED[model]).read_text())


def teacher_config(model: str = "", checkpoint: Path | str = "", config: Path | str = "") -> TeacherConfig:
    return TeacherConfig(model=model, pretrained="", checkpoint=str(checkpoint), config=str(config))


def random_released_state(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with a key list's names, shapes and dtypes; shared names hold one tensor.

    Norm gains near 1 and positive running variances, so the network's outputs are finite.
    """
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for entry in key_list(model)["keys"]:
        name, shape, dtype = entry["name"], entry["shape"], getattr(torch, entry["dtype"])
        partner = next((n for n in entry.get("same_tensor_as", []) if n in state), None)
        leaf = name.rpartition(".")[2]
        if partner:
            state[name] = state[partner]
        elif dtype == torch.int64:
            state[name] = torch.zeros(shape, dtype=dtype)
        elif leaf == "running_var":
            state[name] = torch.rand(shape, generator=generator) + 0.5
        elif leaf == "weight" and entry["module"] in ("LayerNorm", "BatchNorm2d"):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[name] = 0.02 * torch.randn(shape, generator=generator)
    return state


def demo_model(seed: int = 0) -> MSCLIP:
    torch.manual_seed(seed)
    model, _ = build_model(teacher_config(config=DEMO_CONFIG), allow_random=True)
    return model


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalised(model: MSCLIP, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.mark.parametrize("name", list(RELEASED))
def test_the_built_in_models_have_the_released_layout(name):
    """Names in order, shapes, dtypes, norm eps, conv settings, sharing, counts and forward shapes."""
    reference = key_list(name)
    torch.manual_seed(0)
    model = MSCLIP(MSCLIP_CONFIGS[name]).eval()
    state = model.state_dict(keep_vars=True)
    assert list(state) == [entry["name"] for entry in reference["keys"]]
    modules = dict(model.named_modules(remove_duplicate=False))
    for entry in reference["keys"]:
        tensor, module = state[entry["name"]], modules[entry["name"].rpartition(".")[0]]
        assert (list(tensor.shape), str(tensor.dtype)) == (entry["shape"], f"torch.{entry['dtype']}"), entry["name"]
        assert isinstance(tensor, torch.nn.Parameter) == (entry["kind"] == "parameter"), entry["name"]
        if "eps" in entry:
            assert module.eps == entry["eps"], entry["name"]
        if "conv" in entry:
            assert [list(module.stride), list(module.padding), module.groups] == [
                entry["conv"]["stride"], entry["conv"]["padding"], entry["conv"]["groups"]], entry["name"]
    assert sorted(map(sorted, shared_names(model))) == sorted(map(sorted, reference["shared"]["groups"]))
    counts = reference["counts"]
    assert sum(p.numel() for p in model.parameters()) == counts["parameters_unique"]
    assert sum(state[group[0]].numel() for group in shared_names(model)) == \
        counts["parameters_split"]["shared_visual_text"]

    shapes = {}

    def record(label, shape_of):  # a forward hook keeping the shapes it sees under `label`
        def hook(module, inputs, output):
            shapes[label] = shape_of(inputs, output)
        return hook

    transformer = model.visual.transformer
    transformer.stem.register_forward_hook(record("stem", lambda i, out: list(out.shape)))
    for j, (stage, adapter) in enumerate(zip(transformer.parallel_branch_v, transformer.parallel_lateral_adapter,
                                               strict=True)):
        stage.register_forward_hook(record(f"branch {j}", lambda i, out: list(out.shape)))
        # upstream's adapter passes its branch input on unchanged; its tokens are (L, N, D), batch-first here
        adapter.register_forward_hook(record(f"adapter {j}", lambda i, out: [list(i[0].shape), [
            out.shape[1], out.shape[0], out.shape[2]]]))
    check = reference["forward_check"]
    with torch.no_grad():
        image, text = model(torch.randn(check["encode_image_input"]),
                            torch.randint(0, 49408, check["encode_text_input"]))[:2]
    assert list(image.shape) == check["encode_image_output"] and list(text.shape) == check["encode_text_output"]
    expected = {}
    for key, shape in check["visual_intermediate_shapes"].items():
        module = key.split(" ")[0]
        index = module.rpartition(".")[2]
        label = ("stem" if module.endswith("resblocks.0") else
                 f"branch {index}" if "parallel_branch_v" in module else f"adapter {index}")
        expected[label] = shape
    assert shapes == expected


def test_a_released_layout_checkpoint_loads_strictly_through_the_teacher_path(tmp_path):
    state = random_released_state("MS-CLIP-S-B-32")
    checkpoint = tmp_path / "b32-laion-msclips_ckpt.pth"
    torch.save(state, checkpoint)
    teacher = load_teacher(teacher_config("MS-CLIP-S-B-32", checkpoint), "cpu", precision="fp32")
    loaded = teacher.model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    assert teacher.image_size == 224 and teacher.embed_dim == 512
    assert teacher.mean == (0.485, 0.456, 0.406) and teacher.std == (0.229, 0.224, 0.225)
    assert teacher.model.visual.preprocess_cfg["interpolation"] == "bicubic"
    identity = parse_identity(teacher.identity)
    assert (identity["model"], identity["arch_kind"], identity["act"], identity["checkpoint"]) == (
        "MS-CLIP-S-B-32", "ms-clip", "quickgelu", checkpoint.name)

    tokenizer = key_list("MS-CLIP-S-B-32")["tokenizer"]
    for example in tokenizer["examples"]:
        ids = teacher.tokenizer([example["text"]])[0]
        assert ids.shape == (tokenizer["context_length"],)
        assert ids[:len(example["ids"])].tolist() == example["ids"] and not ids[len(example["ids"]):].any()
    images = teacher.encode_image(pixels(1, 224))
    texts = teacher.encode_text(CAPTIONS[:2])
    for embeddings in (images, texts):
        assert embeddings.shape[1] == 512 and torch.isfinite(embeddings).all()
        assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(embeddings)), atol=1e-5)
    assert not torch.allclose(texts[0], texts[1], atol=1e-3)


def test_checkpoints_that_do_not_fit_are_one_line_errors_naming_the_file(tmp_path):
    state = demo_model().state_dict()
    cases = {
        "missing.safetensors": ({k: v for k, v in state.items() if k != "visual.proj"}, "missing 1: visual.proj"),
        "misshapen.safetensors": ({**state, "ln_final.weight": torch.zeros(3)}, "wrong shape 1: ln_final.weight (3,)"),
        "unequal.safetensors": ({**state, "transformer.resblocks.1.mlp.c_fc.bias":
                                 state["transformer.resblocks.1.mlp.c_fc.bias"] + 1}, "shares one tensor"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / name
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
        with pytest.raises(PipelineError, match="does not fit|shares") as error:
            load_teacher(teacher_config(checkpoint=path, config=DEMO_CONFIG), "cpu")
        assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
        assert "\n" not in str(error.value)
    without_model = tmp_path / "unnamed.pt"
    torch.save(state, without_model)
    with pytest.raises(PipelineError, match="an MS-CLIP state dict.*--teacher-model"):
        load_teacher(teacher_config(checkpoint=without_model), "cpu")


def test_wrapped_and_prefixed_checkpoints_load(tmp_path):
    model = demo_model(seed=1).eval()
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    teacher = load_teacher(teacher_config(checkpoint=path, config=DEMO_CONFIG), "cpu", precision="fp32")
    images = pixels(2, 64)
    with torch.no_grad():
        expected = model.encode_image(normalised(model, images), normalize=True)
    assert torch.allclose(teacher.encode_image(images), expected, atol=1e-6)


def test_the_towers_share_one_tensor_per_shared_weight():
    model = demo_model()
    image_blocks, text_blocks = model.visual.transformer.resblocks, model.transformer.resblocks
    assert len(text_blocks) == 6 and len(image_blocks) == 6  # the image tower's block 0 is the stem
    for image_block, text_block in zip(image_blocks[1:], text_blocks[1:], strict=True):
        assert image_block.attn.in_proj_weight is text_block.attn.in_proj_weight
        assert image_block.mlp.c_proj.bias is text_block.mlp.c_proj.bias
        assert image_block.ln_1.weight is not text_block.ln_1.weight
    shared = {name for group in shared_names(model) for name in group}
    text_only = {name for name, _ in model.named_parameters(remove_duplicate=False)
                 if not name.startswith("visual.") and name not in shared and name != "logit_scale"}
    assert {"transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.3.ln_2.bias"} <= text_only

    before = {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}
    text = open_clip_tokens(model)
    with torch.no_grad():
        text_features = model.encode_text(text)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.encode_image(normalised(model, pixels(4, 64))).square().sum().backward()  # the image tower only
    optimizer.step()
    changed = {name for name, p in model.named_parameters(remove_duplicate=False) if not torch.equal(p, before[name])}
    assert {"transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.5.mlp.c_fc.weight"} <= changed
    assert not changed & text_only
    with torch.no_grad():
        assert not torch.allclose(model.encode_text(text), text_features)


def open_clip_tokens(model: MSCLIP) -> torch.Tensor:
    import open_clip

    return open_clip.SimpleTokenizer(context_length=model.context_length)(CAPTIONS)


def test_the_demo_config_trains_saves_as_fp16_and_loads_back(tmp_path):
    model = demo_model()
    assert model.visual.image_size == (64, 64) and model.visual.output_dim == 128
    settings = json.loads(DEMO_CONFIG.read_text())
    assert model.text_projection.shape == (settings["width"], 128) and model.context_length == 32
    images, text = normalised(model, pixels(4, 64)), open_clip_tokens(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        image_features, text_features, scale = model(images, text)
        logits = scale * image_features @ text_features.T
        loss = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert model.visual.transformer.stem.bn1.num_batches_tracked == 4  # BatchNorm statistics are trained too

    weights = tmp_path / "demo-msclip.safetensors"
    save_weights(model, weights)
    teacher = load_teacher(teacher_config(checkpoint=weights, config=DEMO_CONFIG), "cpu", allow_random=False,
                           precision="fp32")
    assert parse_identity(teacher.identity)["arch_kind"] == "ms-clip" and "weights=random" not in teacher.identity
    model.eval()
    rounded = demo_model()
    rounded.load_state_dict({k: v.half() for k, v in model.state_dict().items()})
    rounded.eval()
    views = pixels(3, 64, seed=5)
    with torch.no_grad():
        assert torch.allclose(teacher.encode_image(views),
                              rounded.encode_image(normalised(model, views), normalize=True), atol=1e-5)
        assert torch.allclose(teacher.encode_text(CAPTIONS), rounded.encode_text(text, normalize=True), atol=1e-5)
        trained = model.encode_image(normalised(model, views), normalize=True)
        similarity = (teacher.encode_image(views) * trained).sum(-1)
    assert (similarity > 0.999).all()


def test_identities_name_the_architecture_kind(tmp_path):
    vit_config = ROOT / "data" / "teachers" / "demo-vit.json"
    two_tower = parse_identity(teacher_identity(teacher_config(config=vit_config)))
    ms_clip = parse_identity(teacher_identity(teacher_config(config=DEMO_CONFIG)))
    assert (two_tower["arch_kind"], ms_clip["arch_kind"]) == ("two-tower", "ms-clip")
    explicit = tmp_path / "demo-vit-explicit.json"  # "arch": "two-tower" spelled out: the same build
    explicit.write_text(json.dumps({**json.loads(vit_config.read_text()), "arch": "two-tower"}))
    assert parse_identity(teacher_identity(teacher_config(config=explicit)))["arch"] == two_tower["arch"]
    assert load_teacher(teacher_config(config=explicit), "cpu", allow_random=True).embed_dim == 128
    assert ms_clip["act"] == "quickgelu" and ms_clip["config"] == "demo-msclip.json"
    b32, b16 = (parse_identity(teacher_identity(teacher_config(name))) for name in RELEASED)
    assert b32["arch"] != b16["arch"] and b32["model"] == "MS-CLIP-S-B-32"


def test_inconsistent_configs_and_missing_weights_are_one_line_errors(tmp_path):
    settings = json.loads(DEMO_CONFIG.read_text())
    cases = {
        "strides.json": ({**settings, "stem_strides": [2, 2, 2, 2, 1]}, "grid"),
        "kernels.json": ({**settings, "lateral_kernels": [4, 4]}, "lateral kernel 4"),
        "unknown.json": ({**settings, "depth": 3}, "unknown MS-CLIP config keys depth"),
        "arch.json": ({**settings, "arch": "ms-clip-v2"}, "arch 'ms-clip-v2' unknown"),
    }
    for name, (values, message) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(values))
        with pytest.raises(PipelineError, match=message) as error:
            teacher_identity(teacher_config(config=path))
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    with pytest.raises(PipelineError, match="MS-CLIP-S-B-32: no weights given; set --teacher-checkpoint"):
        load_teacher(teacher_config("MS-CLIP-S-B-32"), "cpu")
    tagged = TeacherConfig(model="MS-CLIP-S-B-16", pretrained="openai", checkpoint="", config="")
    with pytest.raises(PipelineError, match="MS-CLIP has no download tags") as error:
        teacher_identity(tagged)
    assert "\n" not in str(error.value)
