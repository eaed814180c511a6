import pytest
import torch

from unrelearn.errors import UnrelearnError
from unrelearn.methods import resolve_method, select_parameters, unlearn
from unrelearn.methods.esd import esd_target
from unrelearn.methods.uce import cross_attention_projections, uce_solve

FAST_ESD = {"steps": 2, "batch_size": 2, "ddim_steps": 4}


def test_uce_closed_form_equals_least_squares():
    torch.manual_seed(0)
    w_old = torch.randn(6, 10, dtype=torch.float64)
    e_f, e_r = torch.randn(7, 10, dtype=torch.float64), torch.randn(12, 10, dtype=torch.float64)
    v_f, v_r = torch.randn(7, 6, dtype=torch.float64), e_r @ w_old.T
    erase, preserve, lam = 1.3, 0.7, 0.5
    w = uce_solve(w_old, e_f, v_f, e_r, v_r, erase, preserve, lam)
    # Stack the three weighted objectives as one least-squares problem in W^T.
    inputs = torch.cat([erase**0.5 * e_f, preserve**0.5 * e_r, lam**0.5 * torch.eye(10, dtype=torch.float64)])
    targets = torch.cat([erase**0.5 * v_f, preserve**0.5 * v_r, lam**0.5 * w_old.T])
    oracle = torch.linalg.lstsq(inputs, targets).solution.T
    assert torch.allclose(w, oracle, atol=1e-10)


def test_uce_maps_forget_tokens_to_the_guide_and_keeps_preserved(tiny_model):
    cls, _ = resolve_method("uce")
    from unrelearn.worlds import get_world

    method = cls(tiny_model, get_world("shapes").concept_sets("circle"), cls.Config(lam=1e-4))
    forget, guide, preserve = method.embeddings()
    before = {n: m.weight.detach().clone() for n, m in cross_attention_projections(tiny_model.unet).items()}
    stats = method.edit(forget, guide, preserve)
    assert stats["edited_projections"] == len(before) > 0
    for name, module in cross_attention_projections(tiny_model.unet).items():
        w_old = before[name]
        erased = (forget @ module.weight.T - guide @ w_old.T).norm() / (guide @ w_old.T).norm()
        kept = (preserve @ module.weight.T - preserve @ w_old.T).norm() / (preserve @ w_old.T).norm()
        untouched = (forget @ w_old.T - guide @ w_old.T).norm() / (guide @ w_old.T).norm()
        assert erased < 0.5 * untouched and kept < 0.5, name


def test_uce_alternative_guide_and_clean_preserve_rows(tiny_model):
    from unrelearn.methods.uce import ALTERNATIVE_GUIDE
    from unrelearn.worlds import get_world

    cls, _ = resolve_method("uce")
    sets = get_world("shapes").concept_sets("circle")
    plain = cls(tiny_model, sets, cls.Config())
    mapped = cls(tiny_model, sets, cls.Config(guide=ALTERNATIVE_GUIDE, preserve_clean=True))
    assert plain.guide_prompt() == "" and mapped.guide_prompt() == "a square"
    _, guide_rows, few = plain.embeddings()
    _, square_rows, many = mapped.embeddings()
    rows_per_prompt = few.shape[0] // len(sets.preserve)
    assert many.shape[0] == (len(sets.preserve) + len(sets.clean)) * rows_per_prompt
    expected = tiny_model.encode_prompts(["a square"]).reshape(-1, square_rows.shape[-1]).cpu()
    assert torch.equal(square_rows[:rows_per_prompt], expected) and not torch.equal(square_rows, guide_rows)


def test_esd_target_is_negative_guidance():
    eps_uncond, eps_concept = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert torch.equal(esd_target(eps_uncond, eps_concept, 0.0), eps_uncond)
    assert torch.equal(esd_target(eps_uncond, eps_concept, 1.0), torch.tensor([-1.0, 3.0]))
    assert torch.equal(esd_target(eps_uncond, eps_concept, 3.0), eps_uncond - 3 * (eps_concept - eps_uncond))


@pytest.mark.parametrize("x_t_from", ["frozen", "trained"])
def test_esd_samples_x_t_with_the_network_it_names(tiny_model, x_t_from, monkeypatch):
    from unrelearn.worlds import get_world

    cls, _ = resolve_method("esd")
    method = cls(tiny_model, get_world("shapes").concept_sets("circle"), cls.Config(batch_size=1, ddim_steps=3, x_t_from=x_t_from))
    used = []
    batched = tiny_model.denoise_groups
    monkeypatch.setattr(tiny_model, "denoise_groups", lambda groups, **kw: used.append(kw["unet"]) or batched(groups, **kw))
    original = method.sampled_x_t
    method.sampled_x_t = lambda prompts, generator, unet: used.append(unet) or original(prompts, generator, unet)
    method.loss(0, torch.Generator().manual_seed(0))
    assert used == [method.teacher if x_t_from == "frozen" else tiny_model.unet]
    assert method.teacher is not tiny_model.unet


def test_denoise_groups_equals_separate_denoise_calls(tiny_model):
    groups, expected = [], []
    for seed, (prompts, stop) in enumerate([(["a red circle"], 3), (["a blue square", "a ring"], 1), (["a cross"], 4)]):
        expected.append(tiny_model.denoise(prompts, steps=5, guidance=2.0, generator=torch.Generator().manual_seed(seed),
                                           stop_after=stop))  # fmt: skip
        noise = torch.randn(tiny_model.sample_shape(len(prompts)), generator=torch.Generator().manual_seed(seed))
        groups.append((prompts, noise, stop))
    for (x, t), (x_expected, t_expected) in zip(tiny_model.denoise_groups(groups, steps=5, guidance=2.0), expected):
        assert t == t_expected and torch.allclose(x, x_expected, atol=1e-5)  # float32 rounding of other batch sizes


def test_esd_batched_x_t_gives_the_step_by_step_weights(minilm, monkeypatch):
    """x_t sampled X_T_BLOCK steps at a time (across a block boundary) = one step at a time.
    SGD, not Adam: Adam's normalisation blows the rounding of batched matmuls on one thread
    (OMP_NUM_THREADS=1) up to 2e-4 in 23 steps; SGD keeps it at 2e-7."""
    from conftest import tiny_unet
    from diffusers import DDPMScheduler

    from unrelearn.methods import esd
    from unrelearn.model import DiffusionModel

    weights = []
    for block in (1, esd.X_T_BLOCK):
        monkeypatch.setattr(esd, "X_T_BLOCK", block)
        model = DiffusionModel(tiny_unet(), *minilm, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), max_length=20,
                               info={"world": "shapes"})  # fmt: skip
        initial = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
        overrides = FAST_ESD | {"steps": 23, "lr": 1e-1, "optimizer": "sgd"}
        unlearn(model, "esd-u-1", "circle", overrides=overrides, progress=False)
        weights.append(model.unet.state_dict())
    assert max((weights[1][n] - initial[n]).abs().max() for n in initial) > 1e-3
    assert all(torch.allclose(weights[0][n], weights[1][n], atol=1e-6) for n in weights[0])


def test_esd_rejects_an_unknown_x_t_source(tiny_model, tmp_path):
    with pytest.raises(UnrelearnError, match="option x_t_from='ema' must be one of 'frozen', 'trained'"):
        unlearn(tiny_model, "esd-u-1", "circle", out=tmp_path / "esd", overrides={**FAST_ESD, "x_t_from": "ema"})
    assert not (tmp_path / "esd").exists()


def test_variant_names():
    assert resolve_method("esd-u-1")[1] == {"scope": "u", "eta": 1.0}
    assert resolve_method("esd-f-3")[1] == {"scope": "f", "eta": 3.0}
    assert resolve_method("esd-x-1")[1] == {"scope": "x", "eta": 1.0}
    with pytest.raises(UnrelearnError, match="unknown method 'esd-q-1'"):
        resolve_method("esd-q-1")


def test_scopes_select_the_documented_parameters(tiny_model):
    unet = tiny_model.unet
    x, u, f = (set(select_parameters(unet, s)) for s in "xuf")
    assert x and all(".attn2." in n for n in x)
    assert f == {n for n, _ in unet.named_parameters()}
    assert not (x & u)
    assert not any(n.startswith(("time_embedding.", "conv_out.")) for n in u)
    assert f - x - u == {n for n in f if n.startswith(("time_embedding.", "conv_out."))}
    with pytest.raises(UnrelearnError, match="unknown scope"):
        select_parameters(unet, "z")


@pytest.mark.parametrize("variant", ["esd-x-1", "esd-u-1"])
def test_esd_changes_only_its_scope(tiny_model, variant):
    before = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters()}
    scope = set(select_parameters(tiny_model.unet, variant.split("-")[1]))
    unlearn(tiny_model, variant, "circle", overrides=FAST_ESD | {"lr": 1e-2}, progress=False)
    for name, p in tiny_model.unet.named_parameters():
        changed = not torch.equal(p, before[name])
        if name not in scope:
            assert not changed, name
    assert any(not torch.equal(p, before[n]) for n, p in tiny_model.unet.named_parameters() if n in scope)


def test_same_seed_same_weights(minilm, tmp_path):
    from conftest import tiny_unet
    from diffusers import DDPMScheduler

    from unrelearn.model import DiffusionModel

    def fresh():
        scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
        return DiffusionModel(tiny_unet(), *minilm, scheduler, max_length=20, info={"world": "shapes"})

    a, b = fresh(), fresh()
    unlearn(a, "esd-u-1", "circle", overrides=FAST_ESD | {"seed": 4}, progress=False)
    unlearn(b, "esd-u-1", "circle", overrides=FAST_ESD | {"seed": 4}, progress=False)
    for (name, p), q in zip(a.unet.named_parameters(), b.unet.parameters()):
        assert torch.equal(p, q), name


def test_bad_requests(tiny_model, tmp_path):
    with pytest.raises(UnrelearnError, match="closed-form: it takes no --steps"):
        unlearn(tiny_model, "uce", "circle", overrides={"steps": 10})
    with pytest.raises(UnrelearnError, match="unknown method 'nope'"):
        unlearn(tiny_model, "nope", "circle")
    with pytest.raises(UnrelearnError, match="unknown concept"):
        unlearn(tiny_model, "uce", "unicorn")
    with pytest.raises(UnrelearnError, match="has no option bogus"):
        unlearn(tiny_model, "esd", "circle", overrides={"bogus": 1})
    with pytest.raises(UnrelearnError, match="erasediff: option target='gaussian' must be one of"):
        unlearn(tiny_model, "erasediff", "circle", overrides={"target": "gaussian"})


def test_unlearn_writes_a_loadable_folder_with_run_record(tiny_model, tmp_path):
    import json

    from unrelearn.model import DiffusionModel

    record = unlearn(tiny_model, "uce", "striped", out=tmp_path / "uce", progress=False)
    run = json.loads((tmp_path / "uce" / "run.json").read_text())
    assert run["method"] == "uce" and run["concept"] == "striped" and "versions" in run and "wall_seconds" in run
    loaded = DiffusionModel.load(tmp_path / "uce")
    assert loaded.info["unlearned"] == {"method": "uce", "concept": "striped"}
    assert record["stats"]["edited_projections"] > 0


def test_rece_adversarial_embedding_minimises_its_objective():
    from unrelearn.methods.rece import adversarial_embedding

    torch.manual_seed(1)
    edited = [torch.randn(5, 8, dtype=torch.float64) for _ in range(3)]
    original = [w + 0.3 * torch.randn_like(w) for w in edited]
    concept = torch.randn(2, 8, dtype=torch.float64)
    closed = adversarial_embedding(edited, original, concept, regularizer=0.1)

    def objective(e):
        return sum(((e @ w.T - concept @ w_star.T) ** 2).sum() for w, w_star in zip(edited, original)) + 0.1 * (e**2).sum()

    e = torch.zeros_like(concept, requires_grad=True)
    optimizer = torch.optim.LBFGS([e], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = objective(e)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert torch.allclose(closed, e.detach(), atol=1e-6)
    assert objective(closed) <= objective(e.detach()) + 1e-9


def test_rece_erases_more_than_uce_against_the_adversarial_embedding(tiny_model):
    from unrelearn.methods.rece import adversarial_embedding
    from unrelearn.worlds import get_world

    sets = get_world("shapes").concept_sets("circle")
    projections = cross_attention_projections(tiny_model.unet)
    original = [m.weight.detach().clone() for m in projections.values()]
    rece_cls, _ = resolve_method("rece")
    method = rece_cls(tiny_model, sets, rece_cls.Config(epochs=2))
    stats = method.apply()
    residuals = [epoch["adversarial_relative_residual"] for epoch in stats["epochs"]]
    assert len(residuals) == 2
    # After the RECE epochs, a fresh adversarial embedding recovers less of the concept than
    # one computed against the UCE edit alone.
    uce_cls, _ = resolve_method("uce")
    forget, _, _ = uce_cls(tiny_model, sets, uce_cls.Config()).embeddings()  # text only: same rows as RECE used
    edited = [m.weight.detach() for m in projections.values()]
    final = adversarial_embedding(edited, original, forget, 0.1)
    final_residual = sum(
        float((final @ w.T - forget @ w_star.T).norm() / (forget @ w_star.T).norm()) for w, w_star in zip(edited, original)
    ) / len(edited)
    assert final_residual > residuals[0]


FAST = {
    "esd": {"steps": 2, "batch_size": 2, "ddim_steps": 4},
    "sdd": {"steps": 2, "batch_size": 2, "ddim_steps": 4},
    "salun": {"steps": 2, "batch_size": 2, "mask_batches": 1},
    "ca": {"steps": 2, "batch_size": 2},
    "erasediff": {"steps": 2, "batch_size": 2},
}


def test_saliency_mask_keeps_the_requested_fraction():
    from unrelearn.methods.salun import saliency_mask

    torch.manual_seed(0)
    gradients = {"a": torch.randn(100, 7), "b": torch.randn(300)}
    for fraction in (0.1, 0.5, 0.9):
        mask = saliency_mask(gradients, fraction)
        kept = sum(m.sum() for m in mask.values()) / 1000
        assert abs(kept - fraction) < 1e-3
        smallest_kept = min(g.abs()[m.bool()].min() for g, m in zip(gradients.values(), mask.values()))
        largest_dropped = max(g.abs()[~m.bool()].max() for g, m in zip(gradients.values(), mask.values()))
        assert smallest_kept >= largest_dropped


def test_salun_trains_only_salient_weights(tiny_model):
    before = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters()}
    cls, _ = resolve_method("salun")
    from unrelearn.worlds import get_world

    world = get_world("shapes")
    method = cls(tiny_model, world.concept_sets("circle"), cls.Config(**FAST["salun"], lr=1e-2), world)
    from unrelearn.training import Trainer

    trainer = Trainer(method.parameters(), method.loss, method.train_config(), progress=False)
    method.bind(trainer)
    trainer.run()
    method.finish()
    kept = sum(m.sum() for m in method.mask.values()) / sum(m.numel() for m in method.mask.values())
    assert abs(kept - 0.5) < 0.01
    for name, p in tiny_model.unet.named_parameters():
        frozen = method.mask[name] == 0
        assert torch.equal(p[frozen], before[name][frozen]), name
    assert any(not torch.equal(p, before[n]) for n, p in tiny_model.unet.named_parameters())


@pytest.mark.parametrize("method, scope", [("sdd", "x"), ("ca", "x")])
def test_method_changes_only_its_scope(tiny_model, method, scope):
    before = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters()}
    allowed = set(select_parameters(tiny_model.unet, scope))
    unlearn(tiny_model, method, "striped", overrides=FAST[method] | {"lr": 1e-2}, progress=False)
    changed = {n for n, p in tiny_model.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= allowed


def test_sdd_saves_its_ema_teacher(tiny_model, monkeypatch):
    from unrelearn.training import Trainer

    trainers = []
    run = Trainer.run
    monkeypatch.setattr(Trainer, "run", lambda self, **kw: trainers.append(self) or run(self, **kw))
    unlearn(tiny_model, "sdd", "circle", overrides=FAST["sdd"] | {"lr": 1e-2, "ema_decay": 0.5}, progress=False)
    (trainer,) = trainers
    # The last iterate differs from the EMA at decay 0.5, so equality means the EMA was copied.
    assert trainer.optimizer.state and all(torch.equal(p, trainer.ema[n]) for n, p in trainer.params.items())


@pytest.mark.parametrize("method, options", [("esd-u-1", {"ddim_steps": 4}), ("dimum", {})])
def test_saved_weights_are_the_moving_average_of_the_iterates(minilm, method, options):
    """With ``ema_decay`` the saved model equals the EMA computed by hand from the last iterates
    of 1-, 2- and 3-step runs (a run's first k steps are the k-step run), decay min(d, (1+s)/(10+s))."""
    from conftest import tiny_unet
    from diffusers import DDPMScheduler

    from unrelearn.model import DiffusionModel

    def weights(steps: int | None, **extra) -> dict[str, torch.Tensor]:
        model = DiffusionModel(tiny_unet(), *minilm, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), max_length=20,
                               info={"world": "shapes"})  # fmt: skip
        if steps is not None:
            overrides = {"steps": steps, "batch_size": 2, "lr": 1e-2, "seed": 1} | extra
            unlearn(model, method, "circle", overrides=overrides, progress=False)
        return {n: p.detach().clone() for n, p in model.unet.named_parameters()}

    iterates = [weights(None)] + [weights(k, **options) for k in (1, 2, 3)]
    expected, ema_decay = iterates[0], 0.15
    for step in range(3):
        decay = min(ema_decay, (1 + step) / (10 + step))
        expected = {n: decay * expected[n] + (1 - decay) * iterates[step + 1][n] for n in expected}
    saved = weights(3, ema_decay=ema_decay, **options)
    changed = [n for n in saved if not torch.equal(iterates[3][n], iterates[0][n])]
    assert changed
    for name in saved:
        torch.testing.assert_close(saved[name], expected[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(saved[n], iterates[3][n]) for n in changed)


@pytest.mark.parametrize("method", ["sdd", "salun", "ca", "erasediff"])
def test_same_seed_same_weights_for_every_method(minilm, method):
    from conftest import tiny_unet
    from diffusers import DDPMScheduler

    from unrelearn.model import DiffusionModel

    def run():
        model = DiffusionModel(tiny_unet(), *minilm, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), max_length=20,
                               info={"world": "shapes"})  # fmt: skip
        unlearn(model, method, "circle", overrides=FAST[method] | {"seed": 2}, progress=False)
        return [p.detach().clone() for p in model.unet.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))
