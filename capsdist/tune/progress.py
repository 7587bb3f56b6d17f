"""The sweep's progress bar as a Ray Tune callback (imports Ray: load it lazily).

Tune pickles its callbacks into the experiment state and, on `--resume`, uses the unpickled
ones. So the callback holds no state: it updates whichever bar `run_sweep` opened in this
process (`BAR`), which also keeps tqdm's stream wrapper out of the pickle.
"""

from __future__ import annotations

from ray import tune

from capsdist.track import ProgressBar

BAR: ProgressBar | None = None


class TrialProgress(tune.Callback):
    def on_trial_complete(self, iteration, trials, trial, **info):
        if BAR is not None:
            BAR.update(1, last=trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        if BAR is not None:
            BAR.update(1, error=trial.trial_id)
