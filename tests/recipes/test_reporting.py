"""The loss-curve figure: whole-number step ticks, held-out points drawn where they exist."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from tellneo.recipes.reporting import loss_figure, plot_loss_curve  # noqa: E402


def test_loss_figure_has_integer_steps_and_held_out_points(tmp_path):
    import matplotlib.pyplot as plt

    records = [{"step": s, "loss": 5.0 - s, "ce": 4.0 - s / 2} for s in (1, 2, 3)]
    records.append({"step": 3, "eval_loss": 2.5})
    fig = loss_figure(records, title="t", held_out={"held-out ce": [(0, 6.0), (3, float("nan"))]})
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert [line.get_label() for line in ax.get_lines()] == ["loss", "ce"]
    scattered = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert scattered == {"held-out loss": [[3.0, 2.5]], "held-out ce": [[0.0, 6.0]]}  # NaN points left out
    plt.close(fig)
    assert loss_figure([], title="t") is None and plot_loss_curve([], tmp_path / "x.png", title="t") is None
    assert plot_loss_curve(records, tmp_path / "l.png", title="t").stat().st_size > 2000
