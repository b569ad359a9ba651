# %% [markdown]
# # Forecasting British electricity demand, and letting AlgoLink pick the winner
#
# We explore half-hourly electricity demand for England and Wales, train two forecasters for the
# next half-hour, publish both to AlgoLink, split the live traffic between them, send the real
# outcome back as each half-hour "arrives", and let an experiment with automatic retirement decide
# which model keeps serving.
#
# Run it as a notebook (`jupyter notebook docs/tutorial/electricity.ipynb`) or as a script
# (`python docs/tutorial/electricity.py`, which saves the plots as PNG files). Either way it needs a
# running server (`ALGOLINK_URL`, default `http://127.0.0.1:8000`; `ALGOLINK_TOKEN` when auth is on)
# and, in the Python environment, `pip install ./clients/python pandas matplotlib scikit-learn
# skl2onnx torch onnx pmdarima`. The data ships inside the `pmdarima` package: nothing is downloaded.

# %%
import os
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from pmdarima.datasets import load_taylor
from sklearn.ensemble import GradientBoostingRegressor

from algolink import Client

URL = os.environ.get("ALGOLINK_URL", "http://127.0.0.1:8000")
MODEL = os.environ.get("TUTORIAL_MODEL", "demand")
OUT = os.environ.get("TUTORIAL_OUT", "tutorial-out")  # where the plots are saved as PNG
os.makedirs(OUT, exist_ok=True)


def show(fig, name):
    """Saved as a PNG; shown inline in a notebook (a script without a display only saves it)."""
    fig.savefig(os.path.join(OUT, f"{name}.png"), dpi=90, bbox_inches="tight")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)
    else:
        plt.show()


# %% [markdown]
# ## 1. The data
# James W. Taylor's series: half-hourly demand (MW) in England and Wales from Monday 5 June to
# Sunday 27 August 2000, twelve weeks, 4032 values.

# %%
y = load_taylor(as_series=True)
y.index = pd.date_range("2000-06-05", periods=len(y), freq="30min", name="time")
y.name = "demand_mw"
print(y.describe().round(0))

fig, axes = plt.subplots(2, 1, figsize=(11, 6))
y.plot(ax=axes[0], lw=0.6, title="Half-hourly demand, England and Wales, summer 2000 (MW)")
profile = y.groupby([y.index.day_of_week, y.index.hour * 2 + y.index.minute // 30]).mean().unstack(0)
profile.columns = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
profile.index = [f"{h // 2:02d}:{30 * (h % 2):02d}" for h in profile.index]
profile.plot(ax=axes[1], title="Mean daily profile by weekday (MW)", lw=1)
fig.tight_layout()
show(fig, "1-demand")

# %% [markdown]
# Two cycles dominate: the day (night trough, morning ramp, early-evening peak) and the week
# (weekends lower). A forecaster for the next half-hour should see the last few values, the same
# half-hour yesterday and last week, and where in the day and week it stands.

# %% [markdown]
# ## 2. Features and two forecasters
# Each row predicts the demand of one half-hour from what is known half an hour before it.
# The last four weeks are held out: they will be replayed as live traffic.

# %%
LAGS = [1, 2, 3, 4, 48, 336]
features = pd.DataFrame({f"lag_{k}": y.shift(k) for k in LAGS})
slot = y.index.hour * 2 + y.index.minute // 30
features["slot_sin"] = np.sin(2 * np.pi * slot / 48)
features["slot_cos"] = np.cos(2 * np.pi * slot / 48)
features["weekend"] = (y.index.day_of_week >= 5).astype(float)
data = features.assign(target=y).dropna()
cut = y.index[-1] - pd.Timedelta(weeks=4)
train, held_out = data[data.index <= cut], data[data.index > cut]
X = train.drop(columns="target").to_numpy(np.float32)
Y = train["target"].to_numpy(np.float32)
X_live = held_out.drop(columns="target").to_numpy(np.float32)
Y_live = held_out["target"].to_numpy()
print(f"{len(X)} training rows, {len(X_live)} held-out half-hours to replay")

# %% [markdown]
# A gradient-boosting model (scikit-learn), and a small neural network (PyTorch: one hidden layer
# of 16, standardisation inside the module so the exported model takes raw features, trained for
# 100 full-batch steps, a few seconds on a laptop's CPU).

# %%
gbm = GradientBoostingRegressor(n_estimators=300, max_depth=4, learning_rate=0.05, random_state=0).fit(X, Y)


class SmallNet(torch.nn.Module):
    def __init__(self, X, Y, hidden=16):
        super().__init__()
        self.register_buffer("mu", torch.tensor(X.mean(0)))
        self.register_buffer("sd", torch.tensor(X.std(0)))
        self.y_mu, self.y_sd = float(Y.mean()), float(Y.std())
        self.body = torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, x):
        return self.body((x - self.mu) / self.sd) * self.y_sd + self.y_mu


torch.manual_seed(0)
net = SmallNet(X, Y)
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
xt, yt = torch.tensor(X), torch.tensor(Y)[:, None]
for step in range(100):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(net(xt), yt)
    loss.backward()
    opt.step()
net.eval()

with torch.no_grad():
    offline = {"gradient boosting": gbm.predict(X_live), "neural network": net(torch.tensor(X_live)).numpy()[:, 0]}
offline_mae = {k: float(np.mean(np.abs(p - Y_live))) for k, p in offline.items()}
for k, v in offline_mae.items():
    print(f"held-out mean absolute error, {k}: {v:.1f} MW")

# %% [markdown]
# ## 3. Publish both and split the traffic
# `push` exports each model to ONNX on the fly (skl2onnx, torch.onnx) and stores it as an
# immutable, sha256-addressed version. The policy keeps both loaded and lets an experiment retire
# the loser.

# %%
client = Client(URL)
pushed = [client.push(gbm, MODEL, sample=X[:1]), client.push(net, MODEL, sample=X[:1])]
for p in pushed:
    print(f"{p['name']} version {p['version']}: {p['state']}, sha256 {p['sha256'][:16]}…")
gbm_v, net_v = [p["version"] for p in pushed]
names = {gbm_v: "gradient boosting", net_v: "neural network"}
# A second run of the tutorial on the same server starts a new experiment: end the old one.
for old in client.experiments(MODEL):
    if old["state"] == "running":
        client.stop_experiment(old["id"])
client.policy(MODEL, {"version_policy": {"latest": 2}, "retirement": {"on_loss": True}})
client.route(MODEL, {gbm_v: 50, net_v: 50})
experiment = client.experiment(MODEL, goal="reward", min_effect=50.0, min_samples=100)
print("experiment", experiment["id"], "over versions", experiment["versions"])
p = client.predict(MODEL, X_live[:1])
print(f"a first forecast: {next(iter(p.values())).item():.0f} MW, from version {p.version}")

# %% [markdown]
# ## 4. Replay the held-out weeks as live traffic
# Each half-hour, a client asks for the forecast (its routing key is the timestamp, so a retry
# would land on the same model); when the real demand arrives, it reports the negative absolute
# error as the reward. The server's controller watches the experiment's always-valid test.

# %%
served = []
retired, decided_at = None, None
for i, (when, x) in enumerate(zip(held_out.index, X_live)):
    p = client.predict(MODEL, x[None, :], key=when.isoformat())
    forecast = float(next(iter(p.values())).ravel()[0])
    error = abs(forecast - Y_live[i])
    client.feedback(p, -error)
    served.append((when, p.version, forecast, Y_live[i], error))
    if retired is None and i % 50 == 49:
        states = {v["version"]: v["state"] for v in client.versions(MODEL)}
        retired = next((v for v in names if states.get(v) == "retired"), None)
        if retired is not None:
            decided_at = when
            print(f"after {i + 1} half-hours ({when}), version {retired} ({names[retired]}) is retired")
live = pd.DataFrame(served, columns=["time", "version", "forecast", "actual", "abs_error"]).set_index("time")
print("live traffic per version, mean absolute error of what each served:")
print(live.groupby("version")["abs_error"].agg(["count", "mean"]).rename(index=names).round(1))
if retired is not None:
    print("after the decision:", live[live.index > decided_at]["version"].map(names).value_counts().to_dict())

# %% [markdown]
# ## 5. What the server decided, and why
# The loser's retirement is in the event log with the test's figures; all traffic now goes to
# the winner.

# %%
deadline = time.time() + 30
while retired is None and time.time() < deadline:
    states = {v["version"]: v["state"] for v in client.versions(MODEL)}
    retired = next((v for v in names if states.get(v) == "retired"), None)
    time.sleep(0.5)
assert retired is not None, "the experiment did not decide within the replay"
winner = gbm_v if retired == net_v else net_v
for e in client.events(MODEL, newest=True, limit=20):
    if e["kind"] in ("retired", "experiment", "traffic"):
        print(f"{e['kind']:>10}  {e['message']}")
report = client.experiment_report(experiment["id"])
for v in report["variants"]:
    extra = "" if v["control"] else f", difference {v['difference']:.1f}, p = {v['p_value']:.4f}, {v['verdict']}"
    print(f"version {v['version']} ({names[v['version']]}): {v['outcomes']} outcomes, mean reward {v['mean']:.1f}{extra}")
after = {client.predict(MODEL, X_live[:1], key=f"check-{k}").version for k in range(20)}
print("versions answering now:", after)
assert after == {winner}, after

fig, ax = plt.subplots(figsize=(11, 4))
last_days = live.loc[live.index[0] : live.index[0] + pd.Timedelta(days=7)]
ax.plot(last_days.index, last_days["actual"], color="black", lw=1.2, label="actual")
for v, group in last_days.groupby("version"):
    ax.scatter(group.index, group["forecast"], s=8, label=f"v{v} {names[v]}")
if decided_at is not None and decided_at <= last_days.index[-1]:
    ax.axvline(decided_at, color="grey", ls="--", lw=1, label="version retired")
ax.set_title("The first week of live forecasts, by the version that answered, against the demand (MW)")
ax.legend()
show(fig, "2-live")

# %% [markdown]
# ## 6. The console and the metrics
# The same story in the browser: the model's page shows the versions (one `retired`, with its
# reason), the live charts and the experiment; the event log page filters by model.

# %%
print(f"console: {URL}/ui#/model/{MODEL}   events: {URL}/ui#/events?model={MODEL}")
for line in client.metrics().splitlines():
    if line.startswith(("algolink_requests_total", "algolink_experiment_outcomes_total")) and f'model="{MODEL}"' in line:
        print(line)

# %% [markdown]
# ## The result

# %%
for k in offline_mae:
    print(f"forecast error (held-out MAE) of the {k}: {offline_mae[k]:.1f} MW")
print(f"winner: version {winner} ({names[winner]}); retired: version {retired} ({names[retired]})")
assert offline_mae[names[winner]] < offline_mae[names[retired]], "the server kept the model with the lower error"
