"""Timestep respacing: sample with a subset of a trained diffusion's timesteps (Improved DDPM §4).

A model trained on T steps samples with K < T steps by keeping K of the original timesteps and
recomputing β so that ᾱ at every kept step is unchanged: β'_k = 1 - ᾱ_{t_k} / ᾱ_{t_{k-1}}. The
respaced diffusion carries a ``timestep_map`` (step k -> original t_k) so the network is always
called with the timesteps it was trained on.

Spacing strings follow ADM: ``"250"`` takes 250 evenly spread steps (first and last included);
``"10,15,20"`` splits the T steps into 3 equal sections and takes 10, 15 and 20 steps from them;
``"ddim50"`` takes the strided set ``range(0, T, stride)`` that has exactly 50 elements, the DDIM
paper's uniform schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitdit.errors import VitditError


def _parse_sections(spec: str) -> list[int]:
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise VitditError(
            f"timestep_respacing {spec!r} is not a step count, a comma-separated list of counts, or 'ddimN'"
        ) from None
    if any(c < 1 for c in counts):
        raise VitditError(f"timestep_respacing {spec!r} has a section with fewer than 1 step")
    return counts


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """The sorted original timesteps to keep out of ``num_timesteps`` for the given spacing."""
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        spec = section_counts[len("ddim") :]
        if not spec.isdigit() or int(spec) < 1:
            raise VitditError(
                f"timestep_respacing {section_counts!r}: expected 'ddimN' with N a positive integer"
            )
        desired = int(spec)
        if desired == num_timesteps:
            return list(range(num_timesteps))
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise VitditError(
            f"timestep_respacing {section_counts!r}: no integer stride gives exactly {desired} of "
            f"{num_timesteps} steps (DDIM spacing needs range(0, T, stride) to have N elements)"
        )
    if isinstance(section_counts, str):
        counts = _parse_sections(section_counts)
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise VitditError(f"timestep_respacing {section_counts!r}: every section needs at least 1 step")

    # Split [0, T) into len(counts) sections, the first T % n one step longer, and spread each
    # section's count evenly over it with both ends included (round-half-even, as ADM's Python does).
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise VitditError(
                f"timestep_respacing {section_counts!r}: cannot take {count} steps from a section of {size} "
                f"(diffusion has {num_timesteps} steps)"
            )
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return sorted(set(kept))


def respace_betas(
    alphas_cumprod: torch.Tensor, use_timesteps: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """β of the respaced chain and its ``timestep_map`` from the base ᾱ and the kept timesteps."""
    steps = sorted(set(int(t) for t in use_timesteps))
    if not steps or steps[0] < 0 or steps[-1] >= alphas_cumprod.numel():
        raise VitditError(f"respaced timesteps must lie in [0, {alphas_cumprod.numel()}), got {steps[:3]}...")
    kept = alphas_cumprod[steps].to(torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
    betas = 1.0 - kept / prev
    return betas, torch.tensor(steps, dtype=torch.long)
