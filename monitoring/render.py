"""Render the Grafana dashboard's panels to a PNG from a Prometheus server's real data, for people
without Grafana at hand:

    python -m monitoring.render --prometheus http://127.0.0.1:9090 --minutes 15 --out docs/dashboard.png

Each panel of monitoring/grafana/dashboards/tokencarve.json becomes one small chart: time series as
lines, "stat" panels as their latest value. Grafana variables get the values given on the command line.
"""

from __future__ import annotations

import argparse
import time

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .dashboards import DEFAULT_PRICE, DEFAULT_SPEEDUP, dashboard  # noqa: E402

# Grafana unit ids -> axis labels (the rest are shown as they are)
GRAFANA_UNITS = {"currencyUSD": "USD", "none": "", "percent": "%", "ops": "per s", "decbytes": "bytes"}


def substitute(expr: str, step_s: int, range_s: int, price: float, speedup: float) -> str:
    for placeholder, value in {
        "$__rate_interval": f"{max(4 * step_s, 60)}s",
        "$__range": f"{range_s}s",
        "$gpu_hour_price": str(price),
        "$speedup": str(speedup),
    }.items():
        expr = expr.replace(placeholder, value)
    return expr


def query_range(url: str, expr: str, start: float, end: float, step_s: int) -> list[dict]:
    reply = httpx.get(
        f"{url}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step_s}, timeout=30
    ).json()
    if reply.get("status") != "success":
        raise RuntimeError(f"{expr}: {reply}")
    return reply["data"]["result"]


def legend(template: str, labels: dict) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def render_png(
    url: str, start: float, end: float, path: str, price: float = DEFAULT_PRICE, speedup: float = DEFAULT_SPEEDUP
) -> int:
    """Draw every panel; returns how many panels had data."""
    panels = dashboard()["panels"]
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(15, 3.2 * rows), squeeze=False)
    step_s = max(1, int((end - start) / 200))
    with_data = 0
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel["title"], fontsize=10)
        unit = panel["fieldConfig"]["defaults"]["unit"]
        unit = GRAFANA_UNITS.get(unit, unit)
        drawn = False
        for target in panel["targets"]:
            expr = substitute(target["expr"], step_s, int(end - start), price, speedup)
            for series in query_range(url, expr, start, end, step_s):
                times = [float(t) - start for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                label = legend(target["legendFormat"], series["metric"])
                if panel["type"] == "stat":
                    ax.text(
                        0.5,
                        0.5,
                        f"{values[-1]:.4g} {unit}",
                        ha="center",
                        va="center",
                        fontsize=16,
                        transform=ax.transAxes,
                    )
                    ax.set_xticks([])
                    ax.set_yticks([])
                else:
                    ax.plot(times, values, label=label, linewidth=1.2)
                drawn = True
        if drawn:
            with_data += 1
            if panel["type"] != "stat":
                ax.set_xlabel("seconds", fontsize=8)
                ax.set_ylabel(unit, fontsize=8)
                ax.legend(fontsize=7, loc="best")
                ax.tick_params(labelsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.suptitle(
        f"{dashboard()['title']} (rendered from Prometheus, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return with_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--minutes", type=float, default=15)
    p.add_argument("--out", default="docs/dashboard.png")
    p.add_argument("--gpu-hour-price", type=float, default=DEFAULT_PRICE)
    p.add_argument("--speedup", type=float, default=DEFAULT_SPEEDUP)
    args = p.parse_args()
    end = time.time()
    count = render_png(args.prometheus, end - 60 * args.minutes, end, args.out, args.gpu_hour_price, args.speedup)
    print(f"wrote {args.out}: {count} panels with data")


if __name__ == "__main__":
    main()
