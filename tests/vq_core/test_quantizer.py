import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from vq_core.quantizer import QuantizerOutput, VectorQuantizer, code_statistics

MODES = ["ema", "loss"]


def _clustered_batch(
    centres: torch.Tensor, n: int, spread: float, generator: torch.Generator
) -> torch.Tensor:
    """n vectors around randomly chosen centres, as an n x D x 1 x 1 map."""
    which = torch.randint(0, centres.shape[0], (n,), generator=generator)
    vectors = centres[which] + spread * torch.randn(n, centres.shape[1], generator=generator)
    return vectors[:, :, None, None]


# ------------------------------------------------------------------------------------------
# shapes and contract


@pytest.mark.parametrize("update", MODES)
@pytest.mark.parametrize("shape", [(3, 8, 5, 7), (3, 8, 11), (6, 8)])
def test_forward_shapes_and_codes_index_the_codebook(update, shape):
    quantizer = VectorQuantizer(16, 8, update=update)
    z = torch.randn(shape)
    out = quantizer(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape
    assert out.codes.shape == (shape[0], *shape[2:])
    assert out.codes.dtype == torch.long
    for scalar in (out.loss, out.commitment, out.codebook_loss, out.perplexity, out.usage):
        assert scalar.shape == ()
    # The forward values are the code vectors themselves (in eval mode the codebook does not
    # move after the lookup).
    quantizer.eval()
    out = quantizer(z)
    torch.testing.assert_close(out.quantized, quantizer.lookup(out.codes))


def test_output_keeps_the_input_memory_layout_and_dtype():
    quantizer = VectorQuantizer(16, 8).eval()
    z = torch.randn(2, 8, 4, 5)
    assert quantizer(z).quantized.is_contiguous()
    channels_last = z.to(memory_format=torch.channels_last)
    out = quantizer(channels_last)
    assert out.quantized.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.quantized, quantizer(z).quantized)
    half = quantizer(z.bfloat16())
    assert half.quantized.dtype == torch.bfloat16
    assert half.commitment.dtype == torch.float32


def test_wrong_channel_count_names_value_and_expected_dim():
    quantizer = VectorQuantizer(16, 8)
    with pytest.raises(ValueError, match=r"expected 8 channels.*got 5"):
        quantizer(torch.randn(2, 5, 4, 4))


def test_lookup_rejects_bad_codes():
    quantizer = VectorQuantizer(16, 8)
    with pytest.raises(TypeError, match="torch.long"):
        quantizer.lookup(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 15\].*\[0, 16\]"):
        quantizer.lookup(torch.tensor([[0, 16]]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(update="kmeans"), "'kmeans'"),
        (dict(decay=1.0), r"decay must lie in \(0, 1\), got 1.0"),
        (dict(decay=0.0), r"decay must lie in \(0, 1\), got 0.0"),
        (dict(num_codes=0), "num_codes must be >= 1, got 0"),
        (dict(dim=0), "dim must be >= 1, got 0"),
        (dict(beta=-0.5), "beta must be >= 0, got -0.5"),
        (dict(epsilon=0.0), "epsilon must be > 0, got 0.0"),
        (dict(dead_code_threshold=-1.0), "dead_code_threshold must be >= 0, got -1.0"),
        (dict(chunk_size=0), "chunk_size must be >= 1 or None, got 0"),
    ],
)
def test_invalid_constructor_arguments_name_the_value(kwargs, match):
    args = dict(num_codes=16, dim=8) | kwargs
    with pytest.raises(ValueError, match=match):
        VectorQuantizer(args.pop("num_codes"), args.pop("dim"), **args)


def test_smallest_valid_sizes_work():
    quantizer = VectorQuantizer(1, 1, chunk_size=1, beta=0.0)
    out = quantizer(torch.randn(3, 1, 2))
    assert out.codes.tolist() == [[0, 0]] * 3


def test_construction_follows_the_paper_and_keeps_integer_state():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(4, 4096)
    assert quantizer.beta == 0.25
    # Initial codebook uniform in [-1/K, 1/K], filling the range.
    codebook = quantizer.codebook
    assert codebook.min() >= -0.25 and codebook.max() <= 0.25
    assert codebook.min() < -0.24 and codebook.max() > 0.24
    # The initial codebook is one pseudo-observation per code: the bias-corrected averages
    # (t = 1) equal it.
    torch.testing.assert_close(quantizer.embed_sum / quantizer.cluster_size[:, None], codebook)
    for name in ("num_updates", "restart_count", "rng_seed"):
        assert getattr(quantizer, name).dtype == torch.long, name


def test_statistics_of_single_vectors():
    quantizer = VectorQuantizer(8, 2).eval()
    quantizer.codebook.copy_(torch.arange(16.0).reshape(8, 2) * 10)
    one = quantizer(torch.tensor([[0.1, 0.0]]))
    assert one.perplexity.item() == pytest.approx(1.0) and one.usage.item() == 1 / 8
    three = quantizer(torch.tensor([[0.1, 0.0], [20.0, 30.0], [60.0, 70.0]]))
    assert three.perplexity.item() == pytest.approx(3.0) and three.usage.item() == 3 / 8


def test_statistics_of_a_code_map_count_every_code_of_the_codebook():
    # Codes 0 and 2 of 8, equally often; the unused codes 3..7 count towards usage's total.
    perplexity, usage = code_statistics(torch.tensor([[0, 2], [2, 0]]), 8)
    assert perplexity.item() == pytest.approx(2.0) and usage.item() == 2 / 8
    perplexity, usage = code_statistics(torch.tensor([5, 5, 5]), 8)
    assert perplexity.item() == pytest.approx(1.0) and usage.item() == 1 / 8


def test_lookup_of_empty_and_single_code_maps():
    quantizer = VectorQuantizer(16, 8)
    assert quantizer.lookup(torch.zeros(0, 2, 2, dtype=torch.long)).shape == (0, 8, 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 15\].*\[16, 16\]"):
        quantizer.lookup(torch.tensor([16]))
    with pytest.raises(ValueError, match=r"batch dimension, got shape \(\)"):
        quantizer.lookup(torch.tensor(3))


def test_bad_inputs_name_the_shape_or_dtype():
    quantizer = VectorQuantizer(16, 8)
    with pytest.raises(ValueError, match=r"B x 8 x \.\.\. tensor, got shape \(8,\)"):
        quantizer(torch.randn(8))
    with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
        quantizer(torch.zeros(2, 8, dtype=torch.long))


def test_statistics_of_a_known_assignment():
    quantizer = VectorQuantizer(8, 2).eval()
    quantizer.codebook.copy_(torch.arange(16.0).reshape(8, 2) * 10)
    # Two vectors near code 0, two near code 3: perplexity 2, usage 2/8.
    z = torch.tensor([[0.1, 0.0], [0.0, 0.2], [60.0, 70.0], [60.2, 70.0]])
    out = quantizer(z)
    assert out.codes.tolist() == [0, 0, 3, 3]
    assert out.perplexity.item() == pytest.approx(2.0)
    assert out.usage.item() == pytest.approx(0.25)
    assert not out.perplexity.requires_grad and not out.usage.requires_grad


# ------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("update", MODES)
def test_straight_through_passes_the_incoming_gradient_unchanged(update):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(32, 4, update=update, beta=0.0)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    incoming = torch.randn(2, 4, 3, 3)
    out = quantizer(z)
    (out.quantized * incoming).sum().backward()
    torch.testing.assert_close(z.grad, incoming, rtol=0, atol=0)


def test_loss_mode_gradients_match_hand_formulas():
    torch.manual_seed(0)
    beta = 0.7
    quantizer = VectorQuantizer(6, 3, update="loss", beta=beta)
    z = torch.randn(4, 3, 2, 2, requires_grad=True)
    out = quantizer(z)
    out.loss.backward()

    flat = z.detach().movedim(1, -1).reshape(-1, 3)
    codes = out.codes.reshape(-1)
    chosen = quantizer.codebook.detach()[codes]
    numel = flat.numel()
    # Codebook term mean((e - sg(z))^2): d/de_k = sum over rows assigned to k of 2 (e_k - z) / numel,
    # independent of beta.
    expected_codebook_grad = torch.zeros(6, 3).index_add_(0, codes, 2 * (chosen - flat) / numel)
    torch.testing.assert_close(quantizer.codebook.grad, expected_codebook_grad)
    # Commitment term beta * mean((z - sg(e))^2) is the encoder's only gradient.
    expected_encoder_grad = beta * 2 * (flat - chosen) / numel
    torch.testing.assert_close(
        z.grad, expected_encoder_grad.reshape(4, 2, 2, 3).movedim(-1, 1), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(out.commitment, F.mse_loss(flat, chosen))
    torch.testing.assert_close(out.codebook_loss, F.mse_loss(chosen, flat))


def test_ema_codebook_is_a_buffer_without_gradient():
    quantizer = VectorQuantizer(16, 4, update="ema", beta=0.5)
    assert list(quantizer.parameters()) == []
    assert not quantizer.codebook.requires_grad
    assert "code_vectors" in dict(quantizer.named_buffers())
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = quantizer(z)
    assert out.codebook_loss.item() == 0.0
    out.loss.backward()
    flat = z.detach().movedim(1, -1).reshape(-1, 4)
    # Pre-update code vectors: what forward looked up, reconstructed from the quantized values.
    chosen = out.quantized.detach().movedim(1, -1).reshape(-1, 4)
    expected = 0.5 * 2 * (flat - chosen) / flat.numel()
    torch.testing.assert_close(z.grad.movedim(1, -1).reshape(-1, 4), expected)


# ------------------------------------------------------------------------------------------
# EMA update


def test_one_ema_update_equals_hand_computed_reference():
    decay, eps = 0.5, 0.1
    quantizer = VectorQuantizer(4, 2, update="ema", decay=decay, epsilon=eps)
    initial = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [10.0, 10.0]])
    quantizer.codebook.copy_(initial)
    quantizer.embed_sum.copy_(initial * (1 - decay))  # the construction-time pseudo-observation
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 0.0], [3.0, 0.0], [0.0, 3.0]])

    out = quantizer(z)
    assert out.codes.tolist() == [0, 0, 1, 1, 2]  # code 3 unused

    # Before: t = 1, N = 0.5 per code, m = 0.5 * e. Batch counts n = [2, 2, 1, 0],
    # sums = [[1, 1], [8, 0], [0, 3], [0, 0]].
    # After (d = 0.5): N = 0.5 N + 0.5 n, m = 0.5 m + 0.5 sums, t = 2.
    counts = torch.tensor([1.25, 1.25, 0.75, 0.25])
    sums = torch.tensor([[0.5, 0.5], [5.0, 0.0], [0.0, 2.5], [2.5, 2.5]])
    torch.testing.assert_close(quantizer.cluster_size, counts)
    torch.testing.assert_close(quantizer.embed_sum, sums)
    assert quantizer.num_updates.item() == 2

    correction = 1 - decay**2  # 0.75
    counts_hat, sums_hat = counts / correction, sums / correction
    total = counts_hat.sum()  # 14 / 3
    smoothed = (counts_hat + eps) / (total + 4 * eps) * total
    expected = sums_hat / smoothed[:, None]
    torch.testing.assert_close(quantizer.codebook, expected)
    # The unused code shrinks a little under the (large) smoothing instead of jumping away.
    assert 0.5 * initial[3].norm() < quantizer.codebook[3].norm() <= initial[3].norm()


def test_eval_mode_does_not_touch_the_codebook():
    quantizer = VectorQuantizer(16, 4, data_init=True, dead_code_threshold=1.0).eval()
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer(torch.randn(8, 4, 3, 3))
    for key, value in quantizer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_first_ema_steps_keep_unused_codes_bounded():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    quantizer = VectorQuantizer(64, 8, update="ema")
    # Data far from the tiny initial codebook: only a few codes get any vectors at first.
    centres = 3.0 + torch.randn(4, 8, generator=gen)
    data_norm = 0.0
    for _ in range(5):
        z = _clustered_batch(centres, 256, 0.1, gen)
        data_norm = max(data_norm, z.norm(dim=1).max().item())
        quantizer(z)
        assert torch.isfinite(quantizer.codebook).all()
        assert quantizer.codebook.norm(dim=1).max().item() <= 1.01 * data_norm


def test_data_init_and_restarts_give_high_usage_on_clustered_data():
    gen = torch.Generator().manual_seed(0)
    num_clusters, dim = 32, 8
    centres = 10.0 * torch.randn(num_clusters, dim, generator=gen)

    def final_usage(**kwargs) -> float:
        torch.manual_seed(0)
        quantizer = VectorQuantizer(num_clusters, dim, **kwargs)
        for _ in range(30):
            quantizer(_clustered_batch(centres, 256, 0.1, gen))
        quantizer.eval()
        return quantizer(_clustered_batch(centres, 4096, 0.1, gen)).usage.item()

    with_help = final_usage(data_init=True, dead_code_threshold=1.0)
    assert with_help >= 0.9
    # Without data init and restarts, codes that lose every vector early stay unused.
    assert final_usage() < with_help


@pytest.mark.parametrize("update", MODES)
def test_dead_codes_are_reseeded_from_batch_vectors_and_counted(update):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, update=update, dead_code_threshold=1.0)
    z = 5.0 + torch.randn(64, 4)
    before = quantizer.codebook.detach().clone()
    quantizer(z)
    changed = ~(quantizer.codebook.detach() == before).all(dim=1)
    assert quantizer.restarts > 0
    # Each re-seeded code is exactly one of the batch's vectors (codes that kept their vectors
    # moved to a mean instead).
    reseeded = (quantizer.codebook.detach()[:, None, :] == z[None]).all(dim=2).any(dim=1)
    assert reseeded.sum().item() == quantizer.restarts
    assert (reseeded <= changed).all()
    if update == "ema":
        # The moving averages of a re-seeded code describe its new vector.
        implied = quantizer.embed_sum[reseeded] / quantizer.cluster_size[reseeded, None]
        torch.testing.assert_close(implied, quantizer.codebook[reseeded])
    restarts_after_one = quantizer.restarts
    quantizer(z)
    assert quantizer.restarts >= restarts_after_one


def test_exactly_the_codes_below_the_dead_code_threshold_are_reseeded():
    # decay 0.5: after one step a code's bias-corrected count per batch is (0.25 + 0.5 n) / 0.75
    # for n vectors: exactly 1 for one vector (not below a threshold of 1), 1/3 for none.
    quantizer = VectorQuantizer(4, 2, update="loss", decay=0.5, dead_code_threshold=1.0)
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    with torch.no_grad():
        quantizer.codebook.copy_(codebook)
    z = codebook[:3]  # one vector for each of codes 0, 1, 2; none for code 3
    quantizer(z)
    assert quantizer.restarts == 1
    assert torch.equal(quantizer.codebook.detach()[:3], codebook[:3])
    assert (quantizer.codebook.detach()[3] == z).all(dim=1).any()


def test_data_initialised_codes_count_as_one_vector_per_batch():
    # Four vectors, four codes: data init makes each vector a code, which then gets that one
    # vector per batch, a count of 1 (decay 0.5: (0.25 + 0.5) / 0.75), alive at threshold 0.95.
    quantizer = VectorQuantizer(
        4, 2, update="loss", decay=0.5, data_init=True, dead_code_threshold=0.95
    )
    z = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    assert quantizer(z).usage.item() == 1.0
    assert quantizer.restarts == 0


def test_data_init_happens_once():
    torch.manual_seed(0)
    # "loss" mode without restarts: after data init only the optimizer moves the codebook.
    quantizer = VectorQuantizer(8, 4, update="loss", data_init=True)
    quantizer(torch.randn(32, 4))
    initialised = quantizer.codebook.detach().clone()
    quantizer(torch.randn(32, 4) + 10.0)
    assert torch.equal(quantizer.codebook.detach(), initialised)


def test_data_init_edge_batches():
    torch.manual_seed(0)
    # Exactly as many vectors as codes: each code is one of them, none perturbed by noise.
    z = torch.randn(16, 4)
    quantizer = VectorQuantizer(16, 4, update="loss", data_init=True)
    quantizer(z)
    matches = (quantizer.codebook.detach()[:, None, :] == z[None]).all(dim=2)
    assert (matches.sum(dim=1) == 1).all() and (matches.sum(dim=0) == 1).all()
    # One vector: the codes are distinct copies of it with small noise.
    one = VectorQuantizer(4, 4, update="loss", data_init=True)
    one(z[:1])
    assert (one.codebook.detach() - z[:1]).abs().max() < 0.05
    assert torch.unique(one.codebook.detach(), dim=0).shape[0] == 4
    with pytest.raises(ValueError, match="^cannot draw code vectors from an empty batch$"):
        VectorQuantizer(4, 4, data_init=True)(torch.zeros(0, 4))


def test_default_search_blocks_cover_large_batches():
    # More rows than one default block holds (2,048 at K = 8,192): the search runs in blocks
    # and still finds the nearest codes.
    gen = torch.Generator().manual_seed(0)
    quantizer = VectorQuantizer(8192, 4)
    quantizer.codebook.copy_(torch.randn(8192, 4, generator=gen))
    flat = torch.randn(2100, 4, generator=gen)
    assert quantizer.search_block_bytes() == 2048 * 8192 * 4
    distances = torch.cdist(flat.double(), quantizer.codebook.double())
    chosen = distances.gather(1, quantizer.nearest(flat)[:, None]).squeeze(1)
    torch.testing.assert_close(chosen, distances.min(dim=1).values, rtol=1e-5, atol=1e-5)


def test_data_init_picks_distinct_batch_vectors():
    torch.manual_seed(0)
    # "loss" mode: a forward pass alone does not move the codebook after data init.
    quantizer = VectorQuantizer(32, 4, update="loss", data_init=True)
    z = torch.randn(40, 4)
    quantizer.eval()
    quantizer(z)
    assert not bool(quantizer.initialized), "data init must wait for a training step"
    quantizer.train()
    quantizer(z)
    codebook = quantizer.codebook.detach()
    matches = (codebook[:, None, :] == z[None]).all(dim=2)
    assert matches.any(dim=1).all(), "every code is one of the batch's vectors"
    assert (matches.sum(dim=0) <= 1).all(), "no vector is used twice"


@pytest.mark.parametrize("update", MODES)
def test_data_init_with_fewer_vectors_than_codes_gives_distinct_codes(update):
    # At every scale of the data, and down to one vector for two codes: the noise that separates
    # the copies follows the data's spread, so the codes are distinct yet stay near the vectors.
    for scale in (1e-3, 1.0, 1e3):
        for num_codes, num_vectors in ((32, 5), (2, 1)):
            torch.manual_seed(0)
            quantizer = VectorQuantizer(num_codes, 4, update=update, data_init=True)
            z = scale * torch.randn(num_vectors, 4)
            quantizer(z)
            assert bool(quantizer.initialized)
            codebook = quantizer.codebook.detach()
            assert torch.unique(codebook, dim=0).shape[0] == num_codes, (scale, num_codes)
            # Every code lies next to one of the vectors.
            distance = torch.cdist(codebook, z).min(dim=1).values.max()
            assert distance < 0.2 * scale, (scale, num_codes)


@pytest.mark.parametrize("update", MODES)
def test_seeded_random_choices_do_not_depend_on_the_global_generator(update):
    # Data init from fewer vectors than codes (drawn with replacement, plus noise) and from
    # more (drawn without): the quantizer's own seed decides, whatever torch's global state.
    gen = torch.Generator().manual_seed(0)
    for num_vectors in (5, 40):
        z = torch.randn(num_vectors, 4, generator=gen)
        codebooks = []
        for global_seed in (0, 1):
            torch.manual_seed(global_seed)
            quantizer = VectorQuantizer(16, 4, update=update, data_init=True, seed=3)
            quantizer(z)
            codebooks.append(quantizer.codebook.detach())
        assert torch.equal(codebooks[0], codebooks[1]), num_vectors


def test_unseeded_quantizers_follow_the_global_seed():
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def data_init(global_seed: int) -> tuple:
        torch.manual_seed(global_seed)
        quantizer = VectorQuantizer(8, 2, update="loss", data_init=True)
        quantizer(z)
        return tuple(map(tuple, quantizer.codebook.tolist()))

    # torch.manual_seed makes a run repeatable, and each global seed gives its own draws: 50
    # seeds, 50 different choices of 8 of the 64 vectors.
    assert data_init(0) == data_init(0)
    assert len({data_init(seed) for seed in range(50)}) == 50


# ------------------------------------------------------------------------------------------
# nearest-code search


@pytest.mark.parametrize("chunk_size", [None, 7, 1000])
def test_nearest_matches_brute_force(chunk_size):
    gen = torch.Generator().manual_seed(0)
    quantizer = VectorQuantizer(100, 16, chunk_size=chunk_size)
    quantizer.codebook.copy_(torch.randn(100, 16, generator=gen))
    flat = torch.randn(999, 16, generator=gen)
    with warnings.catch_warnings():
        # The distances go into one block allocated at its final shape: torch warns when an
        # out= tensor must be resized, which would mean more memory than search_block_bytes().
        warnings.simplefilter("error")
        codes = quantizer.nearest(flat)
    assert codes.shape == (999,) and codes.dtype == torch.long

    distances = torch.cdist(flat.double(), quantizer.codebook.double())
    best = distances.min(dim=1)
    # Where two codes are (numerically) equally near either is right; elsewhere exact match.
    top2 = distances.topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4
    assert clear.float().mean() > 0.99
    assert torch.equal(codes[clear], best.indices[clear])
    chosen = distances.gather(1, codes[:, None]).squeeze(1)
    torch.testing.assert_close(chosen, best.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 13])
def test_nearest_under_bfloat16_autocast_equals_float32(chunk_size):
    # Enough rows and codes that bfloat16 distances (8 mantissa bits) pick another code for a
    # few dozen of the 4,096 vectors: a search that let autocast in would fail here. None is
    # the default single-block path (plain addmm, which CPU autocast casts to bfloat16); 13
    # sends every row through the chunked addmm(out=) path.
    gen = torch.Generator().manual_seed(0)
    quantizer = VectorQuantizer(512, 64, chunk_size=chunk_size)
    quantizer.codebook.copy_(torch.randn(512, 64, generator=gen))
    z = torch.randn(4, 64, 32, 32, generator=gen)
    flat = z.movedim(1, -1).reshape(-1, 64)
    reference = quantizer.nearest(flat)
    assert torch.equal(reference, torch.cdist(flat.double(), quantizer.codebook.double()).argmin(1))
    quantizer.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = quantizer.nearest(flat)
        out = quantizer(z)
    assert torch.equal(codes, reference)
    assert torch.equal(out.codes.reshape(-1), reference)


def test_nearest_refuses_anything_but_n_x_dim():
    quantizer = VectorQuantizer(16, 4)
    for shape in [(10, 3), (10, 4, 1), (4,)]:
        with pytest.raises(ValueError, match=rf"expected an N x 4 tensor, got shape \({shape[0]},"):
            quantizer.nearest(torch.randn(shape))


def test_nearest_runs_without_autograd():
    quantizer = VectorQuantizer(16, 4, update="loss")
    codes = quantizer.nearest(torch.randn(10, 4, requires_grad=True))
    assert not codes.requires_grad


def test_search_block_is_bounded():
    assert VectorQuantizer(16, 4, chunk_size=7).search_block_bytes() == 7 * 16 * 4
    assert VectorQuantizer(16, 4, chunk_size=7).search_block_bytes(3) == 3 * 16 * 4
    # Automatic size: at most 64 MiB of float32 distances, whatever the codebook size.
    for num_codes in (512, 8192):
        quantizer = VectorQuantizer(num_codes, 4)
        assert quantizer.search_block_bytes() <= 64 * 2**20
        assert quantizer.search_block_bytes(65536) < 65536 * num_codes * 4


# ------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("update", MODES)
def test_state_dict_round_trip_resumes_exactly(update):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 4, 2, 2, generator=gen) for _ in range(6)]
    kwargs = dict(update=update, data_init=True, dead_code_threshold=2.0)

    torch.manual_seed(0)
    original = VectorQuantizer(16, 4, **kwargs)
    for z in batches[:3]:
        original(z)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)

    torch.manual_seed(123)  # a different initial codebook and seed, all overwritten by loading
    resumed = VectorQuantizer(16, 4, **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in original.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert resumed.restarts == original.restarts

    for z in batches[3:]:
        original(z)
        resumed(z)
    torch.testing.assert_close(resumed.codebook, original.codebook, rtol=0, atol=0)
    if update == "ema":
        assert torch.equal(resumed.embed_sum, original.embed_sum)
        assert torch.equal(resumed.cluster_size, original.cluster_size)
