"""lora_kernels.rank: LoRA parameter counts equal PEFT's own, target discovery, presets, heuristics, errors."""
import json

import pytest
import torch

from lora_kernels import rank

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def llama_cfg(hidden=256, layers=2, heads=8, kv_heads=8, inter=688, vocab=1000, tie=False):
    return transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                                    tie_word_embeddings=tie)


CONFIGS = {
    "llama-mha": lambda: llama_cfg(kv_heads=8),
    "llama-gqa": lambda: llama_cfg(kv_heads=2),
    "llama-gqa-tied": lambda: llama_cfg(kv_heads=4, tie=True),
    "gpt2": lambda: transformers.GPT2Config(n_embd=96, n_layer=2, n_head=4, vocab_size=500, n_positions=128),
    "phi": lambda: transformers.PhiConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=320, vocab_size=700),
}

TARGET_SETS = {
    "llama-mha": [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"],
    "llama-gqa": [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"],
    "llama-gqa-tied": [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]],
    # c_proj is both attn.c_proj and mlp.c_proj: PEFT's suffix rule adapts both, and so must we.
    "gpt2": [["c_attn"], ["c_attn", "c_proj"], "all-linear"],
    "phi": [["q_proj", "v_proj", "dense"], "all-linear"],
}


def peft_count(config, r, target_modules):
    """PEFT's own (trainable, all) on a meta-device model: the oracle."""
    model = rank.build_meta_model(config)
    spec = target_modules if isinstance(target_modules, str) else list(target_modules)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules=spec))
    return pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch,targets", [(a, t) for a, ts in TARGET_SETS.items() for t in ts],
                         ids=lambda v: v if isinstance(v, str) else ",".join(v))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_count_equals_peft(arch, targets):
    config = CONFIGS[arch]()
    for r in (1, 8):
        c = rank.count_lora_parameters(config, r=r, target_modules=targets)
        assert (c.trainable, c.total) == peft_count(config, r, targets), (arch, targets, r)
        assert c.percent == pytest.approx(100 * c.trainable / c.total)
        assert sum(m.params for m in c.per_module.values()) == c.trainable
        assert sum(m.matrices for m in c.per_module.values()) == c.matrices


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_presets_equal_peft_on_resolved_names():
    for arch in ("llama-gqa", "gpt2", "phi"):
        config = CONFIGS[arch]()
        for preset in rank.TARGET_PRESETS:
            c = rank.count_lora_parameters(config, r=4, target_modules=preset)
            assert (c.trainable, c.total) == peft_count(config, 4, c.modules), (arch, preset)


def test_llama3_8b_from_config_alone_gqa():
    """The real Llama-3-8B shapes on the meta device: the published count, and k/v are 4x narrower."""
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    c = rank.count_lora_parameters(cfg, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert c.trainable == 13_631_488
    assert c.base == 8_030_261_248
    assert c.per_module["q_proj"].params_per_matrix == 16 * (4096 + 4096)
    assert c.per_module["k_proj"].params_per_matrix == 16 * (4096 + 1024)
    assert c.per_module["v_proj"].shapes == ((4096, 1024),)
    assert c.per_module["k_proj"].matrices == 32
    assert (c.trainable, c.total) == peft_count(cfg, 16, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert str(c).startswith("trainable params: 13,631,488 || all params: 8,043,892,736")


def test_all_linear_roughly_triples_attention():
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                                   num_attention_heads=32, vocab_size=32000)
    attn = rank.count_lora_parameters(cfg, r=8, target_modules="attention").trainable
    full = rank.count_lora_parameters(cfg, r=8, target_modules="all-linear").trainable
    assert 2.0 < full / attn < 3.0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_embedding_target_equals_peft():
    cfg = CONFIGS["llama-gqa"]()
    c = rank.count_lora_parameters(cfg, r=4, target_modules=["embed_tokens", "q_proj"])
    assert (c.trainable, c.total) == peft_count(cfg, 4, ["embed_tokens", "q_proj"])
    assert c.per_module["embed_tokens"].params_per_matrix == 4 * (1000 + 256)


def test_config_inputs_agree(tmp_path):
    cfg = CONFIGS["llama-gqa"]()
    cfg.save_pretrained(tmp_path / "model")
    want = rank.count_lora_parameters(cfg, r=8, target_modules="attention")
    for source in (tmp_path / "model", str(tmp_path / "model" / "config.json"), cfg.to_dict()):
        got = rank.count_lora_parameters(source, r=8, target_modules="attention")
        assert (got.trainable, got.total) == (want.trainable, want.total)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_4bit_model_counts_like_peft(tmp_path):
    """A real bitsandbytes NF4 model: Linear4bit layers are found, packed weights counted as PEFT does."""
    pytest.importorskip("bitsandbytes")
    from lora_kernels.demo import llama_config, load_4bit, save_tiny_llama

    save_tiny_llama(tmp_path / "tiny", llama_config())
    model = load_4bit(tmp_path / "tiny", compute_dtype=torch.float32)
    groups = rank.find_target_modules(model)
    assert groups["q_proj"].kind == "Linear4bit"
    assert groups["k_proj"].shapes == ((64, 32),)
    c = rank.count_lora_parameters(model, r=8, target_modules="all-linear")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    assert (c.trainable, c.total) == pm.get_nb_trainable_parameters()
    with pytest.raises(ValueError, match="already has PEFT adapters"):
        rank.count_lora_parameters(pm, r=8)


def test_find_target_modules_llama_gqa():
    groups = rank.find_target_modules(CONFIGS["llama-gqa"]())
    assert list(groups) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    assert groups["q_proj"].shapes == ((256, 256),)
    assert groups["k_proj"].shapes == ((256, 64),)  # 2 of 8 heads
    assert groups["down_proj"].shapes == ((688, 256),)
    assert groups["q_proj"].count == 2 and groups["q_proj"].pattern == "model.layers.*.self_attn.q_proj"
    assert groups["q_proj"].in_attention and not groups["gate_proj"].in_attention
    assert groups["lm_head"].is_output_head and not groups["q_proj"].is_output_head
    assert "k_proj" in rank.format_target_modules(groups) and "256->64" in rank.format_target_modules(groups)


def test_find_target_modules_gpt2_conv1d_names_disambiguated():
    groups = rank.find_target_modules(CONFIGS["gpt2"]())
    assert set(groups) == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head"}
    assert groups["c_attn"].kind == "Conv1D" and groups["c_attn"].shapes == ((96, 288),)
    assert groups["mlp.c_proj"].shapes == ((384, 96),)
    # a group name is usable as a target: it selects that group only
    c = rank.count_lora_parameters(CONFIGS["gpt2"](), r=2, target_modules=["mlp.c_proj"])
    assert c.matrices == 2 and c.trainable == 2 * 2 * (384 + 96)


def test_presets_resolve_by_role():
    def suffixes(cfg, preset):
        return {n.rsplit(".", 1)[-1] for n in rank.resolve_targets(rank.as_model(cfg), preset)}

    llama, gpt2, phi = CONFIGS["llama-gqa"](), CONFIGS["gpt2"](), CONFIGS["phi"]()
    assert suffixes(llama, "qv") == {"q_proj", "v_proj"}
    assert suffixes(llama, "q,v") == {"q_proj", "v_proj"}
    assert suffixes(llama, "attention") == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert suffixes(llama, "mlp") == {"gate_proj", "up_proj", "down_proj"}
    assert "lm_head" not in suffixes(llama, "all-linear")
    assert suffixes(gpt2, "qv") == {"c_attn"}
    attn = rank.resolve_targets(rank.as_model(gpt2), "attention")
    assert all(".attn." in n for n in attn) and len(attn) == 4
    assert suffixes(phi, "attention") == {"q_proj", "k_proj", "v_proj", "dense"}
    assert suffixes(phi, "mlp") == {"fc1", "fc2"}


def test_regex_targets_follow_peft():
    cfg = CONFIGS["llama-gqa"]()
    c = rank.count_lora_parameters(cfg, r=4, target_modules=r".*\.layers\.0\.self_attn\.(q|v)_proj")
    assert c.matrices == 2
    assert (c.trainable, c.total) == peft_count(cfg, 4, r".*\.layers\.0\.self_attn\.(q|v)_proj")


@pytest.mark.parametrize("r", [0, -1, 1.5, True, "8"])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        rank.count_lora_parameters(CONFIGS["llama-gqa"](), r=r, target_modules="attention")


def test_unmatched_target_names_it_and_lists_layers():
    with pytest.raises(ValueError) as err:
        rank.count_lora_parameters(CONFIGS["llama-gqa"](), r=4, target_modules=["q_proj", "qproj"])
    msg = str(err.value)
    assert "'qproj'" in msg and "matches no module" in msg and "q_proj, k_proj" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="not a linear layer"):
        rank.count_lora_parameters(CONFIGS["llama-gqa"](), r=4, target_modules=["self_attn"])
    with pytest.raises(ValueError, match="not a valid regex"):
        rank.count_lora_parameters(CONFIGS["llama-gqa"](), r=4, target_modules="(q_proj")
    with pytest.raises(ValueError, match="matches no module"):
        rank.count_lora_parameters(CONFIGS["llama-gqa"](), r=4, target_modules="nothing.*here")


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        rank.load_config(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        rank.load_config(tmp_path / "empty_dir")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        rank.load_config(bad)
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="no 'model_type'"):
        rank.load_config(bad)
    bad.write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ValueError, match="does not know model_type 'no-such-arch'"):
        rank.load_config(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        rank.load_config(bad)


def test_alpha_conventions():
    assert rank.alpha_for(8, "2r") == 16 and rank.alpha_for(8, "r") == 8 and rank.alpha_for(8, "16") == 16
    assert rank.alpha_for(64, 16) == 16 and rank.alpha_for(4, "2*r") == 8
    assert rank.scaling(16, 32) == 2.0 and rank.scaling(16, 32, rslora=True) == 8.0
    for bad in ("3q", "-1", 0):
        with pytest.raises(ValueError, match="alpha"):
            rank.parse_alpha(bad)


@pytest.mark.parametrize("task,size,r,targets", [
    ("style", 500, 4, "attention"),
    ("format", 50_000, 8, "attention"),
    ("domain", 5_000, 8, "all-linear"),
    ("domain", 50_000, 16, "all-linear"),
    ("classification", 2_000, 16, "attention"),
    ("classification", 20_000, 32, "attention"),
    ("instruction", 20_000, 64, "all-linear"),
    ("reasoning", 5_000, 32, "all-linear"),
    ("reasoning", 200_000, 64, "all-linear"),
    ("reasoning", 2_000_000, 128, "all-linear"),
    (None, None, 16, "all-linear"),
    ("unknown", 1_000, 16, "all-linear"),
])
def test_recommend(task, size, r, targets):
    rec = rank.recommend(task, size)
    assert rec.r == r and rec.alpha == 2 * r and rec.target_modules == targets
    assert rec.r_range[0] <= rec.r <= rec.r_range[1]
    text = str(rec)
    assert f"r={r}" in text and "alpha = 2r" in text and "alpha = r" in text and "16" in text
    assert len(rec.reasons) >= 4


def test_recommend_details_and_errors():
    assert any("rsLoRA" in why for why in rank.recommend("reasoning", 500_000).reasons)
    assert any("triples" in why for why in rank.recommend("domain", 1000).reasons)
    assert any("over-fitting" in why for why in rank.recommend("style", 100).reasons)
    rec = rank.recommend("domain", 20_000, model=CONFIGS["llama-gqa"]())
    assert rec.count.trainable == rank.count_lora_parameters(CONFIGS["llama-gqa"](), 16, "all-linear").trainable
    with pytest.raises(ValueError, match="unknown task 'poetry-slam'"):
        rank.recommend("poetry-slam", 100)
    with pytest.raises(ValueError, match="dataset_size"):
        rank.recommend("style", 0)
