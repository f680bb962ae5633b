"""The comparison with "Deconstructing RWKV, Part 3", from ``<out>/epochs.csv`` (:mod:`harness.synthetic.train`) and
the decoding benchmark's rows at the same model size (``<out>/inference.csv``, ``python -m
harness.synthetic.latency``: the benchmark's grid on the trained shapes), beside the article's numbers
(``results/published/deconstructing-rwkv-part3.csv``).

* Final epoch, per model: mean and 95% t-interval across seeds (:func:`harness.report.stats.mean_ci95`) of the test
  accuracy over the predictable positions (``test_acc``; by pattern ``test_acc_short`` and ``test_acc_long``), over
  all positions (``test_acc_all``), and the final train and test losses.
* ``<figures>/curves.png``: test accuracy and losses per epoch, the mean of the seeds with its 95% t-interval band.
* Latency and memory at L 32/64/128/256, batch 1: median ms per decode step after a prefill of L tokens, and the
  prefill's ms per token (the article does not say which of the two its "per-token latency" is), and weights plus
  the measured state or KV cache. Ours come from this machine's CPU, the article's from hardware it does not name:
  the ratios between models and the growth with L are what compare, not the milliseconds.

``python -m harness.synthetic --report`` writes ``<out>/summary.md`` and the figure; ``python -m harness.report``
adds the same section to results/summary.md (:func:`synthetic_markdown`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from harness.bench import decoding_report
from harness.bench.grid import BenchCsv, device_label
from harness.env import REPO_ROOT
from harness.errors import HarnessError
from harness.figures import finish_figure
from harness.report.stats import mean_ci95
from harness.synthetic.train import FIELDS, complete_rows
from harness.tables import markdown_table

EXPERIMENT = "synthetic-article3"
PUBLISHED = Path("published") / "deconstructing-rwkv-part3.csv"
LABELS = {"rwkv": "RWKV-7", "transformer": "Transformer", "lstm": "LSTM",
          "lstm_deep": "LSTM 5x32 (the decoding benchmark's)"}
ACCURACIES = ("test_acc", "test_acc_all", "test_acc_short", "test_acc_long", "train_acc")
LOSSES = ("train_loss", "test_loss", "test_loss_pred")
LENGTHS = (32, 64, 128, 256)


# --- training ---------------------------------------------------------------------------------------------


def read_epochs(path: Path) -> pd.DataFrame:
    """Every row of ``epochs.csv`` with numeric columns as numbers; one line when it is missing or empty."""
    if not path.exists():
        raise HarnessError(f"{path} does not exist; run python -m harness.synthetic first")
    rows = complete_rows(BenchCsv(path, FIELDS).rows())
    if not rows:
        raise HarnessError(f"{path} has no rows")
    frame = pd.DataFrame(rows, columns=list(FIELDS))
    numeric = [c for c in FIELDS if c not in ("model", "setup", "timestamp")]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    return frame


def planned_epochs(frame: pd.DataFrame) -> int:
    """The epochs of the set-up the rows share (its ``epochs=`` key)."""
    setup = dict(word.split("=", 1) for word in frame["setup"].iloc[0].split())
    return int(setup["epochs"])


def _order(models: pd.Series) -> list[str]:
    known = [m for m in LABELS if m in set(models)]
    return known + sorted(set(models) - set(known))


def final_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model, over the seeds that reached the last epoch: seeds, params, mean seconds per epoch, and for every
    accuracy and loss its mean and the half-width of its 95% t-interval (``<metric>_ci95``, NaN with one seed)."""
    last = planned_epochs(frame)
    final = frame[frame["epoch"] == last]
    rows = []
    for model in _order(final["model"]):
        runs = final[final["model"] == model].sort_values("seed")
        row: dict[str, object] = {"model": model, "seeds": len(runs), "params": int(runs["params"].iloc[0]),
                                  "epochs": last,
                                  "s_per_epoch": float(frame[frame["model"] == model]["seconds"].mean())}
        for metric in (*ACCURACIES, *LOSSES):
            mean, half = mean_ci95(runs[metric].to_numpy(dtype=float))
            row |= {metric: mean, f"{metric}_ci95": np.nan if half is None else half}
        rows.append(row)
    return pd.DataFrame(rows)


def read_published(path: Path) -> pd.DataFrame | None:
    """The article's numbers (quantity, arm, value, unit, source), or None where the file is missing."""
    return pd.read_csv(path) if path.exists() else None


def _published(article: pd.DataFrame | None, quantity: str, arm: str) -> float | None:
    if article is None:
        return None
    found = article[(article["quantity"] == quantity) & (article["arm"] == arm)]["value"]
    return float(found.iloc[0]) if len(found) else None


def _pm(mean: float, half: float, scale: float = 1.0, digits: int = 3) -> str:
    if np.isnan(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text if np.isnan(half) else f"{text} ± {half * scale:.{digits}f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def accuracy_markdown(table: pd.DataFrame, article: pd.DataFrame | None) -> str:
    """The final numbers beside the article's: accuracies in %, losses in nats per token."""
    rows = []
    for _, r in table.iterrows():
        def acc(metric: str, r: pd.Series = r) -> str:
            return _pm(r[metric], r[f"{metric}_ci95"], 100, 1)

        def loss(metric: str, r: pd.Series = r) -> str:
            return _pm(r[metric], r[f"{metric}_ci95"])

        rows.append({
            "model": LABELS.get(r["model"], r["model"]), "params": f"{int(r['params']):,}", "seeds": r["seeds"],
            "article test acc %": _num(_published(article, "test_acc", r["model"]), 1),
            "test_acc % (predictable)": acc("test_acc"), "short-range %": acc("test_acc_short"),
            "long-range %": acc("test_acc_long"), "test_acc_all %": acc("test_acc_all"),
            "article train / test loss": f"{_num(_published(article, 'train_loss', r['model']))} / "
                                         f"{_num(_published(article, 'test_loss', r['model']))}",
            "train_loss": loss("train_loss"), "test_loss": loss("test_loss"),
            "test_loss_pred": loss("test_loss_pred"), "s/epoch": f"{r['s_per_epoch']:.1f}"})
    return markdown_table(pd.DataFrame(rows))


MILESTONE = 0.5  # the accuracy a pattern counts as learnt at


def first_epochs_at(frame: pd.DataFrame, metric: str, threshold: float = MILESTONE) -> pd.DataFrame:
    """Per (model, seed): the first epoch whose ``metric`` reaches ``threshold`` (NaN where none does)."""
    reached = frame[frame[metric] >= threshold].groupby(["model", "seed"])["epoch"].min()
    runs = frame[["model", "seed"]].drop_duplicates().set_index(["model", "seed"])
    return runs.join(reached.rename("epoch")).reset_index()


def milestones_markdown(frame: pd.DataFrame) -> str:
    """When each model learnt each kind of pattern: per seed, the first epoch at 50% test accuracy on it."""
    kinds = {"test_acc_short": "short-range (motifs)", "test_acc_long": "long-range (the recalled key)"}
    rows = []
    for model in _order(frame["model"]):
        row = {"model": LABELS.get(model, model)}
        for metric, kind in kinds.items():
            epochs = first_epochs_at(frame[frame["model"] == model], metric).sort_values("seed")
            row[f"first epoch ≥ {MILESTONE:.0%}, {kind}"] = ", ".join(
                f"seed {seed}: {'never' if np.isnan(epoch) else int(epoch)}"
                for seed, epoch in zip(epochs["seed"], epochs["epoch"], strict=True))
        rows.append(row)
    return markdown_table(pd.DataFrame(rows))


def plot_curves(frame: pd.DataFrame, path: Path) -> None:
    """Test accuracy (predictable and all positions) and train/test loss per epoch: per model the mean over its seeds
    and the 95% t-interval band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("test_acc", "test accuracy, predictable positions"), ("test_acc_all", "test accuracy, all positions"),
              ("train_loss", "train loss (all positions)"), ("test_loss", "test loss (all positions)"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    colors = {model: plt.get_cmap("tab10")(i) for i, model in enumerate(LABELS)}
    for ax, (metric, title) in zip(axes.flat, panels, strict=True):
        for model in _order(frame["model"]):
            runs = frame[frame["model"] == model]
            epochs, means, lows, highs = [], [], [], []
            for epoch, group in runs.groupby("epoch", sort=True):
                mean, half = mean_ci95(group[metric].to_numpy(dtype=float))
                epochs.append(epoch)
                means.append(mean)
                lows.append(mean - (half or 0.0))
                highs.append(mean + (half or 0.0))
            seeds = runs["seed"].nunique()
            color = colors.get(model, "gray")
            label = f"{LABELS.get(model, model)} ({seeds} seed{'s' if seeds > 1 else ''})"
            ax.plot(epochs, means, color=color, linewidth=1.3, label=label)
            ax.fill_between(epochs, lows, highs, color=color, alpha=0.2, linewidth=0)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    first = frame.iloc[0]
    finish_figure(fig, path, f"Synthetic next-token task (vocab 64, L 32-256): mean of seeds, 95% t-interval band; "
                             f"{int(first['params']):,}-parameter RWKV")


def _records(out: Path) -> list[dict]:
    """The run records of ``out`` (runs/<model>-seed<k>.json) that can be read, by file name."""
    records = []
    for path in sorted((out / "runs").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return records


def _data_line(records: list[dict]) -> str:
    """The test set of each seed: its sequences, target positions and predictable share (one record per seed)."""
    seeds = {}
    for record in records:
        test = record.get("data", {}).get("test")
        if test and "seed" in record:
            seeds.setdefault(record["seed"], test)
    parts = [f"seed {seed}: {t['sequences']} sequences, {t['targets']:,} targets, {t['predictable_share']:.1%} "
             f"predictable ({t['short']:,} short-range, {t['long']:,} long-range)" for seed, t in sorted(seeds.items())]
    return "Test sets (runs/*.json): " + "; ".join(parts) + "." if parts else ""


# --- latency and memory -----------------------------------------------------------------------------------


def latency_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (model, impl), batch 1: decode ms per token, prefill ms per token and weights + state/cache (MiB) at each
    of :data:`LENGTHS` that was measured."""
    ok = frame[(frame["status"] == "ok") & (frame["batch"] == 1)]
    rows = []
    for (model, impl), runs in ok.groupby(["model", "impl"], sort=False):
        by_length = runs.drop_duplicates("L", keep="last").set_index("L")
        row: dict[str, object] = {"model": model, "impl": impl, "params": int(by_length["params"].iloc[0])}
        for length in LENGTHS:
            if length in by_length.index:
                at = by_length.loc[length]
                row |= {f"decode_ms_L{length}": float(at["decode_ms_median"]),
                        f"prefill_ms_per_token_L{length}": float(at["prefill_ms"]) / length,
                        f"memory_mib_L{length}": (float(at["weights_bytes"]) + float(at["state_bytes_measured"]))
                        / 2**20}
        rows.append(row)
    table = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(LABELS)}
    return table.sort_values("model", key=lambda s: s.map(order)).reset_index(drop=True) if len(table) else table


def _values(row: pd.Series | dict, prefix: str, digits: int) -> str:
    return " / ".join(_num(row.get(f"{prefix}_L{length}"), digits) for length in LENGTHS)


def _span(low: float | None, high: float | None, digits: int) -> str:
    return "–" if low is None or high is None or np.isnan(low) or np.isnan(high) else \
        f"{low:.{digits}f} to {high:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or np.isnan(a) or np.isnan(b) or b == 0 else a / b


def latency_markdown(table: pd.DataFrame, article: pd.DataFrame | None) -> list[str]:
    """Ours beside the article's, then the ratios that compare across hardware."""
    if table.empty:
        return []
    rows = []
    for _, r in table.iterrows():
        published = {f"latency_L{length}": _published(article, f"latency_ms_L{length}", r["model"])
                     for length in LENGTHS}
        low, high = (_published(article, f"memory_mb_{end}", r["model"]) for end in ("low", "high"))
        rows.append({"model": LABELS.get(r["model"], r["model"]), "impl": r["impl"], "params": f"{r['params']:,}",
                     "article ms/token L32/64/128/256": _values(published, "latency", 2),
                     "decode ms/token": _values(r, "decode_ms", 3),
                     "prefill ms/token": _values(r, "prefill_ms_per_token", 3),
                     "article MB (L32 to L256)": _span(low, high, 1),
                     "weights + state MiB (L32 to L256)": _span(r.get("memory_mib_L32"), r.get("memory_mib_L256"), 3)})
    lines = [markdown_table(pd.DataFrame(rows))]
    by_model = {r["model"]: r for _, r in table.drop_duplicates("model").iterrows()}

    def ours(model: str, column: str) -> float | None:
        return by_model[model].get(column) if model in by_model else None

    ratios = []
    for length in (LENGTHS[0], LENGTHS[-1]):
        ratios.append({"ratio": f"Transformer / RWKV-7 at L{length}",
                       "article": _ratio(_published(article, f"latency_ms_L{length}", "transformer"),
                                         _published(article, f"latency_ms_L{length}", "rwkv")),
                       "ours, decode": _ratio(ours("transformer", f"decode_ms_L{length}"),
                                              ours("rwkv", f"decode_ms_L{length}")),
                       "ours, prefill": _ratio(ours("transformer", f"prefill_ms_per_token_L{length}"),
                                               ours("rwkv", f"prefill_ms_per_token_L{length}"))})
    first, last = LENGTHS[0], LENGTHS[-1]
    for model in LABELS:
        ratios.append({"ratio": f"{LABELS[model]} L{last} / L{first}",
                       "article": _ratio(_published(article, f"latency_ms_L{last}", model),
                                         _published(article, f"latency_ms_L{first}", model)),
                       "ours, decode": _ratio(ours(model, f"decode_ms_L{last}"), ours(model, f"decode_ms_L{first}")),
                       "ours, prefill": _ratio(ours(model, f"prefill_ms_per_token_L{last}"),
                                               ours(model, f"prefill_ms_per_token_L{first}"))})
    for model in LABELS:
        ratios.append({"ratio": f"{LABELS[model]} memory L{last} / L{first}",
                       "article": _ratio(_published(article, "memory_mb_high", model),
                                         _published(article, "memory_mb_low", model)),
                       "ours, decode": _ratio(ours(model, f"memory_mib_L{last}"), ours(model, f"memory_mib_L{first}")),
                       "ours, prefill": None})
    ratio_table = pd.DataFrame(ratios)
    for column in ("article", "ours, decode", "ours, prefill"):
        ratio_table[column] = ratio_table[column].map(lambda v: _num(v, 2))
    return lines + ["Ratios, which compare across hardware (ours: decode = ms per decode step, prefill = prefill ms "
                    "per token; memory: weights + state or cache):", markdown_table(ratio_table)]


# --- the section ------------------------------------------------------------------------------------------


def markdown(out: Path, figures: Path, published: Path) -> list[str]:
    """The section (and the curves figure, written to ``figures/curves.png``); [] without ``out/epochs.csv``."""
    csv_path = out / "epochs.csv"
    if not csv_path.exists():
        return []
    frame = read_epochs(csv_path)
    article = read_published(published)
    table = final_table(frame)
    figure = figures / "curves.png"
    plot_curves(frame, figure)
    records = _records(out)
    env = max((r["environment"][-1] for r in records if r.get("environment")), key=lambda e: e.get("timestamp", ""),
              default={})
    threads = {r.get("config", {}).get("threads") for r in records} - {None}
    cpu = f"{env.get('cpu', 'unknown CPU')} ({env.get('cpu_count', '?')} logical CPUs)"
    machine = (f"{cpu}, torch {env.get('versions', {}).get('torch', '?')}, "
               f"{'/'.join(map(str, sorted(threads))) or '?'} thread(s)")
    setup = frame["setup"].iloc[0]
    lines = [
        '### Synthetic next-token task: RWKV-7 vs Transformer vs LSTM (after "Deconstructing RWKV, Part 3")',
        f"From {csv_path} (`python -m harness.synthetic`; harness/synthetic/task.py defines the task): epoch "
        f"{table['epochs'].iloc[0] if len(table) else '?'} of each (model, seed), mean ± half-width of the 95% "
        f"t-interval across seeds; {machine}, fp32. `test_acc`: next-token accuracy over the positions "
        f"the preceding tokens determine (short-range: motif repeats; long-range: the key recalled at the end), "
        f"`test_acc_all` over every position (noise included); losses are cross-entropy over every position "
        f"(`test_loss_pred`: predictable positions only). Set-up: `{setup}`. The article's numbers "
        f"({published.name}) come from its own unpublished generator, sizes and hardware. Curves: {figure}.",
        *filter(None, [_data_line(records)]),
        accuracy_markdown(table, article),
        f"When each pattern was learnt (from {csv_path}: per seed, the first epoch whose test accuracy on that kind "
        f"of target reaches {MILESTONE:.0%}; the curves are in {figure}):",
        milestones_markdown(frame),
    ]
    inference = out / "inference.csv"
    if inference.exists():
        for rows in decoding_report.series(inference):
            first = rows.frame.iloc[0]
            kv = rows.frame.dropna(subset=["cache_len"])
            extra = f"L + {int(kv['cache_len'].iloc[0] - kv['L'].iloc[0])}" if len(kv) else "L + the decode"
            lines += [
                f"Latency and memory at this size (from {inference}, `python -m harness.synthetic.latency`: the "
                f"decoding benchmark's grid on the trained shapes): "
                f"{first['size']}, {first['dtype']}, batch 1, {device_label(first)} ({cpu}, torch "
                f"{first['torch']}); the article's hardware is not published, so the ratios and the trend with L "
                f"compare, not the ms. The KV cache holds {extra} slots "
                f"(the decode steps timed and their warm-up). Memory here is weights + state or KV cache only; the "
                f"article's 12-68 MB is far above these models' weights, so it counts more than that (what, it "
                f"does not say).",
                *latency_markdown(latency_table(rows.frame), article),
            ]
    return lines


def write(out: Path, figures: Path) -> list[Path]:
    """``out/summary.md`` and ``figures/curves.png`` from ``out/epochs.csv``; returns the files written."""
    lines = markdown(out, figures, REPO_ROOT / "results" / PUBLISHED)
    if not lines:
        raise HarnessError(f"{out / 'epochs.csv'} does not exist; run python -m harness.synthetic first")
    (out / "summary.md").write_text("\n\n".join(lines) + "\n")
    return [out / "summary.md", figures / "curves.png"]


def synthetic_markdown(results_dir: Path, figures_dir: Path) -> list[str]:
    """The section of ``python -m harness.report`` (results/synthetic-article3), [] when it has no epochs.csv."""
    return markdown(results_dir / EXPERIMENT, figures_dir / EXPERIMENT, results_dir / PUBLISHED)
