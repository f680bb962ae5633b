"""Figures with deterministic PNG output, shared by the benchmarks and the report."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: Path) -> None:
    """A PNG without creation time or software stamps, so the same inputs give the same bytes."""
    fig.savefig(path, dpi=110, metadata={"Software": None, "Creation Time": None}, bbox_inches="tight")


def finish_figure(fig, path: Path, title: str) -> None:
    """Suptitle, tight layout, deterministic PNG, close."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
