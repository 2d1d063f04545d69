"""Vector quantizer: nearest-code search, straight-through gradients, EMA or loss codebooks.

A continuous encoder map z_e (B x D x ...) is replaced, vector by vector, by its nearest
codebook entry. The argmin has no gradient, so the decoder's gradient is copied onto z_e
(straight-through). The codebook itself is trained either

- by a loss, ||sg(z_e) - e||^2 (van den Oord et al. 2017), with e an nn.Parameter, or
- by exponential moving averages of the encoder vectors assigned to each code
  (Appendix A.1 of the same paper, used by VQ-VAE-2): no gradient reaches the codebook.

Both modes add the commitment term beta * ||z_e - sg(e)||^2, which only moves the encoder.

Faults of common implementations avoided here:
- EMA statistics started from zero without bias correction make unused codes jump to huge
  norms on the first steps. Here the initial codebook enters the averages as one
  pseudo-observation per code, the averages are bias corrected (divided by 1 - d^t), and
  codes that fall out of use can be re-seeded from current encoder vectors.
- The search never builds an N x K one-hot or distance matrix in full: it runs in row chunks
  of bounded size, in float32 even under autocast, without autograd.
- Under data parallelism every rank keeps the same codebook: the per-batch statistics are
  all-reduced, and every random choice (data init, re-seeding) is drawn from a generator
  shared by all ranks over the concatenation of all ranks' vectors, so N ranks compute
  exactly what one process would on the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Bytes of the distance block the search holds at once. 64 MiB is small next to a model's
# activations, yet each block is one large matmul and one argmin. Many small blocks would be
# faster on an idle CPU (they stay in cache) but much slower on a busy one: every block costs
# two parallel regions whose threads must all be scheduled before either finishes.
_SEARCH_BLOCK_BYTES = 64 * 2**20

# Noise added to data-initialised codes when the batch has fewer vectors than codes, relative
# to the data's standard deviation: duplicates must differ, or they stay tied forever.
_INIT_NOISE_SCALE = 0.01

# The defaults of every quantizer, and of the autoencoder configs that build one: the commitment
# weight of the VQ-VAE paper and its moving-average codebook (Appendix A.1) with decay 0.99.
COMMITMENT_BETA = 0.25
CODEBOOK_UPDATE = "ema"
EMA_DECAY = 0.99

# Distinct streams of the shared generator, so that two draws at the same step never coincide.
_STREAM_DATA_INIT = 0
_STREAM_RESTART = 1


@dataclass
class QuantizerOutput:
    """What one forward pass of a VectorQuantizer returns.

    quantized: B x D x ... straight-through output, z_e + sg(z_q - z_e): values of the codes,
        gradient of the identity onto z_e.
    codes: B x ... long indices into the codebook.
    loss: scalar, beta * commitment + codebook_loss; add it to the model's loss.
    commitment: scalar, ||z_e - sg(e)||^2 (mean over elements), not weighted by beta.
    codebook_loss: scalar, ||sg(z_e) - e||^2 in "loss" mode, 0 in "ema" mode.
    perplexity: detached scalar, exp(entropy) of this batch's code histogram.
    usage: detached scalar, fraction of the codebook used in this batch.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    commitment: torch.Tensor
    codebook_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def code_histogram_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, usage) of a histogram of code counts (length K).

    Perplexity is exp(entropy) of the histogram: the number of equally likely codes with the same
    spread (at most K). Usage is the fraction of the K codes that occur.
    """
    counts = counts.float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -torch.special.xlogy(probs, probs).sum()
    return entropy.exp(), (counts > 0).float().mean()


def code_statistics(codes: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, usage) of a tensor of hard codes in [0, num_codes)."""
    return code_histogram_stats(torch.bincount(codes.flatten().long(), minlength=num_codes))


class _StraightThrough(torch.autograd.Function):
    """Returns z_q, and passes the gradient arriving at it unchanged to z_e.

    The same function as z_e + sg(z_q - z_e), without the two passes over the map that the
    subtraction and addition cost, and with the code values exactly. z_q receives no gradient
    through this path: the codebook learns only from its own loss or the moving averages.
    """

    @staticmethod
    def forward(ctx, z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        return z_q.view_as(z_q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _check_arguments(
    num_codes: int,
    dim: int,
    beta: float,
    update: str,
    decay: float,
    epsilon: float,
    dead_code_threshold: float,
    chunk_size: int | None,
) -> None:
    """Refuse a VectorQuantizer's arguments that make no quantizer, naming the value."""
    if num_codes < 1:
        raise ValueError(f"num_codes must be >= 1, got {num_codes}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if update not in ("ema", "loss"):
        raise ValueError(f"update must be 'ema' or 'loss', got {update!r}")
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must lie in (0, 1), got {decay}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if dead_code_threshold < 0:
        raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")


class VectorQuantizer(nn.Module):
    """Replaces each D-vector of a B x D x ... map by the nearest of num_codes code vectors.

    update="ema" (default) keeps the codebook in a buffer trained by moving averages;
    update="loss" makes it an nn.Parameter trained by the codebook loss. data_init fills the
    codebook from the first training batch; dead_code_threshold > 0 re-seeds codes whose
    (bias-corrected) moving-average count per batch drops below it. chunk_size is the number
    of rows per block of the nearest-code search (None: chosen from the codebook size so a
    block holds about 64 MiB of distances). seed drives the random
    choices of data init and restarts (None: drawn from torch's global generator).
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        beta: float = COMMITMENT_BETA,
        update: str = CODEBOOK_UPDATE,
        decay: float = EMA_DECAY,
        epsilon: float = 1e-5,
        data_init: bool = False,
        dead_code_threshold: float = 0.0,
        chunk_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(
            num_codes, dim, beta, update, decay, epsilon, dead_code_threshold, chunk_size
        )
        self.num_codes = num_codes
        self.dim = dim
        self.beta = beta
        self.update = update
        self.decay = decay
        self.epsilon = epsilon
        self.data_init = data_init
        self.dead_code_threshold = dead_code_threshold
        self.chunk_size = chunk_size
        self._register_state(data_init, seed)
        # Per process, not saved: whether rank 0's state has been copied to this rank yet.
        self._states_synced = False

    def _register_state(self, data_init: bool, seed: int | None) -> None:
        """The codebook and the moving-average state, in the order of the checkpoint's keys."""
        num_codes, dim, decay = self.num_codes, self.dim, self.decay
        # The paper's initialisation for the loss-trained codebook; for EMA it only matters
        # until data init or the first updates replace it.
        initial = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if self.update == "loss":
            self.code_vectors = nn.Parameter(initial)
        else:
            self.register_buffer("code_vectors", initial)

        # Moving-average state. The initial codebook counts as one pseudo-observation per code,
        # stored as it would be after one update (raw = (1 - d) * value, t = 1), so the
        # bias-corrected averages equal the codebook and an unused code keeps its vector
        # instead of being divided by a near-zero count. In "loss" mode only the counts are
        # kept, to find dead codes.
        self.register_buffer("cluster_size", torch.full((num_codes,), 1.0 - decay))
        if self.update == "ema":
            self.register_buffer("embed_sum", initial.clone() * (1.0 - decay))
        self.register_buffer("num_updates", torch.ones((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not data_init))
        self.register_buffer("restart_count", torch.zeros((), dtype=torch.long))
        if seed is None:
            # Drawn from torch's global RNG so that torch.manual_seed makes runs repeatable.
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.register_buffer("rng_seed", torch.tensor(seed, dtype=torch.long))

    # ----------------------------------------------------------------------------------
    # public API

    @property
    def codebook(self) -> torch.Tensor:
        """K x D tensor of the current code vectors."""
        return self.code_vectors

    @property
    def restarts(self) -> int:
        """How many codes have been re-seeded by dead-code restarts so far."""
        return int(self.restart_count.item())

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors of a B x ... long code map, channels first: B x D x ..."""
        if codes.dtype != torch.long:
            raise TypeError(f"codes must be torch.long (int64), got {codes.dtype}")
        if codes.dim() < 1:
            raise ValueError(f"codes must have a batch dimension, got shape {tuple(codes.shape)}")
        if codes.numel() > 0:
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high >= self.num_codes:
                raise ValueError(
                    f"codes must lie in [0, {self.num_codes - 1}], got values in [{low}, {high}]"
                )
        vectors = F.embedding(codes, self.code_vectors)  # B x ... x D
        return vectors.movedim(-1, 1).contiguous()

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (Euclidean) for each row of an N x D tensor: N long.

        Computed as argmin_k (||e_k||^2 - 2 z.e_k) — ||z||^2 is the same for every k — in
        float32 with autocast off, in blocks of rows so the N x K distances never exist at once.
        """
        if flat.dim() != 2 or flat.shape[1] != self.dim:
            raise ValueError(f"expected an N x {self.dim} tensor, got shape {tuple(flat.shape)}")
        device_type = flat.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            flat = flat.detach().float()
            codebook = self.code_vectors.detach().float()
            codebook_t = codebook.t()
            sq_norms = codebook.pow(2).sum(dim=1)
            n = flat.shape[0]
            codes = torch.empty(n, dtype=torch.long, device=flat.device)
            rows = self._search_rows()
            if n <= rows:
                scores = torch.addmm(sq_norms, flat, codebook_t, beta=1.0, alpha=-2.0)
                return torch.argmin(scores, dim=1, out=codes)
            # One preallocated block, reused for every chunk: the allocator then sees a
            # single block of bounded size instead of N/rows transient ones.
            block = torch.empty(rows, self.num_codes, device=flat.device)
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                scores = block[: stop - start]
                torch.addmm(
                    sq_norms, flat[start:stop], codebook_t, beta=1.0, alpha=-2.0, out=scores
                )
                torch.argmin(scores, dim=1, out=codes[start:stop])
            return codes

    def search_block_bytes(self, num_vectors: int | None = None) -> int:
        """Bytes of the distance block nearest() allocates for num_vectors rows (its extra
        memory); None: the largest block, for any number of rows."""
        rows = self._search_rows()
        if num_vectors is not None:
            rows = min(rows, num_vectors)
        return rows * self.num_codes * 4

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize a B x D x ... map (B x D x H x W, B x D x L or B x D)."""
        if z.dim() < 2:
            raise ValueError(f"expected a B x {self.dim} x ... tensor, got shape {tuple(z.shape)}")
        if z.shape[1] != self.dim:
            raise ValueError(
                f"expected {self.dim} channels (dim 1) to match the codebook, got {z.shape[1]} "
                f"in input of shape {tuple(z.shape)}"
            )
        if not z.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {z.dtype}")

        # Channels last so each row is one D-vector; float32 for the search and statistics.
        z_last = z.movedim(1, -1)
        spatial = z_last.shape[:-1]
        flat = z_last.reshape(-1, self.dim).float()

        if self.training and not self._states_synced and _world_size() > 1:
            self._sync_state_from_rank0()
        if self.training and self.data_init and not bool(self.initialized):
            self._initialise_from_data(flat.detach())

        codes_flat = self.nearest(flat)
        # index_add_ rather than bincount, which scans the codes for their range first.
        counts = torch.zeros(self.num_codes, device=flat.device)
        counts.index_add_(0, codes_flat, torch.ones_like(codes_flat, dtype=counts.dtype))

        if self.update == "loss":
            # Gradient flows into the codebook only through this lookup.
            z_q = F.embedding(codes_flat, self.code_vectors.float())
            codebook_loss = F.mse_loss(z_q, flat.detach())
        else:
            z_q = F.embedding(codes_flat, self.code_vectors.detach().float())
            codebook_loss = flat.new_zeros(())
        commitment = F.mse_loss(flat, z_q.detach())
        loss = self.beta * commitment + codebook_loss

        # The codes were chosen with the codebook as it was before this step's update, so the
        # update comes after the lookup.
        if self.training:
            self._update_codebook(flat.detach(), codes_flat, counts)

        quantized = _StraightThrough.apply(flat, z_q)
        quantized = quantized.to(z.dtype).reshape(*spatial, self.dim).movedim(-1, 1)
        # Same memory layout as the input: a channels-last input (torch.channels_last) gets
        # the channels-last result for free, a contiguous one pays one copy.
        if z.is_contiguous():
            quantized = quantized.contiguous()
        perplexity, usage = code_histogram_stats(counts)
        return QuantizerOutput(
            quantized=quantized,
            codes=codes_flat.reshape(spatial),
            loss=loss,
            commitment=commitment,
            codebook_loss=codebook_loss,
            perplexity=perplexity.detach(),
            usage=usage.detach(),
        )

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, update={self.update!r}, "
            f"beta={self.beta}, decay={self.decay}, data_init={self.data_init}, "
            f"dead_code_threshold={self.dead_code_threshold}"
        )

    # ----------------------------------------------------------------------------------
    # codebook training

    def _search_rows(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, _SEARCH_BLOCK_BYTES // (4 * self.num_codes))

    def _bias_correction(self) -> float:
        # 1 - d^t: the weight the moving averages have accumulated after t updates.
        return 1.0 - self.decay ** int(self.num_updates.item())

    @torch.no_grad()
    def _update_codebook(
        self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor
    ) -> None:
        d = self.decay
        if self.update == "ema":
            sums = torch.zeros(self.num_codes, self.dim, device=flat.device)
            sums.index_add_(0, codes, flat)
            # One collective for counts and sums together.
            stats = _all_reduce_sum(torch.cat([sums, counts.unsqueeze(1)], dim=1))
            sums, global_counts = stats[:, : self.dim], stats[:, self.dim]
            self.embed_sum.mul_(d).add_(sums, alpha=1.0 - d)
        else:
            global_counts = _all_reduce_sum(counts.clone())
        self.cluster_size.mul_(d).add_(global_counts, alpha=1.0 - d)
        self.num_updates.add_(1)
        correction = self._bias_correction()
        mean_counts = self.cluster_size / correction

        if self.update == "ema":
            # Laplace smoothing keeps every count positive while preserving their total.
            total = mean_counts.sum()
            smoothed = (mean_counts + self.epsilon) / (total + self.num_codes * self.epsilon)
            smoothed = smoothed * total
            means = (self.embed_sum / correction) / smoothed.unsqueeze(1)
            self.code_vectors.copy_(means.to(self.code_vectors.dtype))

        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat, mean_counts, correction)

    @torch.no_grad()
    def _restart_dead_codes(
        self, flat: torch.Tensor, mean_counts: torch.Tensor, correction: float
    ) -> None:
        dead = (mean_counts < self.dead_code_threshold).nonzero().squeeze(1)
        num_dead = dead.numel()
        if num_dead == 0:
            return
        vectors = self._sample_global_rows(flat, num_dead, _STREAM_RESTART)
        self.code_vectors[dead] = vectors.to(self.code_vectors.dtype)
        # A re-seeded code starts as one pseudo-observation per batch of its new vector, the
        # same footing as a data-initialised code.
        self.cluster_size[dead] = correction
        if self.update == "ema":
            self.embed_sum[dead] = vectors * correction
        self.restart_count.add_(num_dead)

    @torch.no_grad()
    def _initialise_from_data(self, flat: torch.Tensor) -> None:
        vectors = self._sample_global_rows(flat, self.num_codes, _STREAM_DATA_INIT)
        self.code_vectors.copy_(vectors.to(self.code_vectors.dtype))
        d = self.decay
        self.cluster_size.fill_(1.0 - d)
        if self.update == "ema":
            self.embed_sum.copy_(vectors * (1.0 - d))
        self.num_updates.fill_(1)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _sync_state_from_rank0(self) -> None:
        # Ranks may have drawn different initial codebooks and seeds (no DDP wrapper, or
        # different global seeds); from the first training step on they must agree exactly.
        for tensor in [*self.parameters(), *self.buffers()]:
            dist.broadcast(tensor.data, src=0)
        self._states_synced = True

    def _shared_generator(self, stream: int) -> torch.Generator:
        # Seeded by (seed, step, stream): reproducible on resume, and identical on every rank
        # because the seed and step are.
        mixed = int(self.rng_seed) * 1_000_003 + int(self.num_updates) * 8 + stream
        return torch.Generator().manual_seed(mixed % (2**63 - 1))

    def _sample_global_rows(self, flat: torch.Tensor, count: int, stream: int) -> torch.Tensor:
        """count rows drawn at random from the concatenation (in rank order) of all ranks' rows.

        Distinct rows while there are enough; otherwise with replacement plus small noise.
        Each rank fills in the rows it holds and a sum all-reduce assembles the rest, so only
        count x D values travel and every rank gets the same result.
        """
        n_local = flat.shape[0]
        if _world_size() > 1:
            sizes = torch.zeros(_world_size(), dtype=torch.long, device=flat.device)
            sizes[dist.get_rank()] = n_local
            dist.all_reduce(sizes)
            sizes = sizes.tolist()
            offset = sum(sizes[: dist.get_rank()])
        else:
            sizes, offset = [n_local], 0
        total = sum(sizes)
        if total == 0:
            raise ValueError("cannot draw code vectors from an empty batch")

        generator = self._shared_generator(stream)
        with_replacement = total < count
        if with_replacement:
            index = torch.randint(0, total, (count,), generator=generator)
        else:
            index = torch.randperm(total, generator=generator)[:count]
        noise = torch.randn(count, self.dim, generator=generator) if with_replacement else None

        index = index.to(flat.device)
        local = (index >= offset) & (index < offset + n_local)
        rows = torch.zeros(count, self.dim, device=flat.device)
        rows[local] = flat[index[local] - offset]
        rows = _all_reduce_sum(rows)
        if noise is not None:
            scale = _INIT_NOISE_SCALE * max(rows.std().item(), 1e-6) if count > 1 else 1e-6
            rows = rows + noise.to(flat.device) * scale
        return rows
