import numpy as np

from conch import lowrank


def test_lora_param_count_examples():
    assert lowrank.lora_param_count(100, 100, 2) == 400  # instead of 10,000
    assert lowrank.lora_param_count(1536, 1536, 8) == 24_576  # q_proj / o_proj of the 1.5B
    assert lowrank.lora_param_count(1536, 8960, 8) == 83_968  # gate / up / down
    assert lowrank.lora_param_count(1536, 8960, 8) < 0.01 * 1536 * 8960


def test_zero_initialised_B_changes_nothing():
    rng = np.random.default_rng(1)
    d, k, r = 30, 20, 4
    W, x = rng.standard_normal((d, k)), rng.standard_normal((k, 5))
    A, B = lowrank.init_lora(d, k, r)
    assert A.shape == (r, k) and B.shape == (d, r) and not B.any()
    assert np.array_equal(lowrank.lora_forward(W, A, B, x, alpha=16, r=r), W @ x)


def test_merge_equals_forward():
    rng = np.random.default_rng(2)
    d, k, r = 30, 20, 4
    W, A, B = rng.standard_normal((d, k)), rng.standard_normal((r, k)), rng.standard_normal((d, r))
    x = rng.standard_normal((k, 7))
    out = lowrank.lora_forward(W, A, B, x, alpha=16, r=r)
    assert not np.allclose(out, W @ x)
    assert np.allclose(lowrank.merge(W, A, B, alpha=16, r=r) @ x, out)
    assert np.allclose(lowrank.merge(W, A, B, 16, r) @ x[:, 0], out[:, 0])  # a single vector too


def test_svd_error_decreases_and_vanishes_at_true_rank():
    M = lowrank.make_update(60, 40, rank=5, noise=0.0, seed=3)
    assert np.linalg.matrix_rank(M) == 5
    errs = lowrank.errors_vs_rank(M, range(1, 6))
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-7
    for r in (1, 3):  # the closed form matches the explicit approximation
        direct = lowrank.relative_error(M, lowrank.low_rank_approx(M, r))
        assert np.isclose(direct, errs[r - 1])


def test_noisy_update_is_full_rank_but_nearly_low_rank():
    M = lowrank.make_update(100, 100, rank=6, noise=0.02, seed=0)
    assert np.linalg.matrix_rank(M) == 100
    assert lowrank.errors_vs_rank(M, [6])[0] < 0.03


def test_low_rank_target_has_its_rank():
    T = lowrank.low_rank_target(50, 40, true_rank=3, seed=0)
    assert T.shape == (50, 40) and np.linalg.matrix_rank(T) == 3
    assert np.isclose(np.linalg.svd(T, compute_uv=False)[0], 1.0)


def test_fit_converges_iff_rank_is_enough():
    k = 4
    T = lowrank.low_rank_target(100, 100, true_rank=k, seed=0)
    for r in (1, 2, 3, 4, 6):
        B, A, losses = lowrank.fit_low_rank(T, r)
        assert B.shape == (100, r) and A.shape == (r, 100)
        if r >= k:
            assert losses[-1] < 1e-8
        else:
            plateau = lowrank.errors_vs_rank(T, [r])[0] ** 2
            assert losses[-1] > 0.05
            assert np.isclose(losses[-1], plateau, rtol=1e-3)  # what the truncated SVD leaves


def test_fit_is_deterministic():
    T = lowrank.low_rank_target(20, 20, 2, seed=1)
    a = lowrank.fit_low_rank(T, 2, steps=50, seed=7)[2]
    b = lowrank.fit_low_rank(T, 2, steps=50, seed=7)[2]
    assert np.array_equal(a, b)


def test_plots_draw():
    import matplotlib

    matplotlib.use("Agg")
    fig = lowrank.plot_approximation(lowrank.make_update(), r=3)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1] == "rank-3 B@A: 600" and titles[0] == "ΔW: 10,000 numbers"
    ax = lowrank.plot_loss_curves({1: np.ones(5), 2: np.linspace(1, 0, 5)})
    assert len(ax.lines) == 2


def test_adapter_update_reads_a_peft_adapter(tmp_path):
    import json

    import pytest
    from safetensors.numpy import save_file

    from conch.errors import ConchError

    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(4, 12)).astype(np.float32), rng.normal(size=(10, 4)).astype(np.float32)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): A, key.format("B"): B}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    update = lowrank.adapter_update(tmp_path, layer=1, module="q_proj")
    assert update.shape == (10, 12) and np.allclose(update, 2 * B.astype(np.float64) @ A)
    assert np.linalg.matrix_rank(update) == 4
    with pytest.raises(ConchError, match="layer 0 v_proj"):
        lowrank.adapter_update(tmp_path, layer=0, module="v_proj")
    with pytest.raises(ConchError, match="train an adapter first"):
        lowrank.adapter_update(tmp_path / "missing")
