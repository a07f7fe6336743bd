"""train.ema: an exponential moving average of the LoRA weights, the weights its samples and files
use. diffusers' EMAModel keeps it (its warm-up: the decay is (1 + n) / (10 + n) after n updates,
at most train.ema_decay); this file only decides when it updates, when it is swapped in, and what
of it the resume state keeps. Without train.ema the loop gets NoEMA, which does nothing."""
import contextlib

from diffusers.training_utils import EMAModel


class NoEMA:
    """train.ema off: the trained weights are the ones sampled and saved."""
    on = False

    def update(self):
        pass

    def applied(self):
        return contextlib.nullcontext()

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass

    def snapshot(self, read):
        return None


class AdapterEMA:
    """The EMA of `parameters` (the LoRA's, on the model and any text encoder)."""
    on = True

    def __init__(self, parameters, decay):
        self.parameters = list(parameters)
        self.average = EMAModel(self.parameters, decay=decay)

    def update(self):
        """After an optimizer step that changed the weights (never after a skipped one)."""
        self.average.step(self.parameters)

    @contextlib.contextmanager
    def applied(self):
        """The EMA weights on the model inside the block; the trained ones (bit for bit) after."""
        self.average.store(self.parameters)
        self.average.copy_to(self.parameters)
        try:
            yield
        finally:
            self.average.restore(self.parameters)

    def state_dict(self):
        return self.average.state_dict()

    def snapshot(self, read):
        """(state_dict, the EMA weights as `read()` gives the model's): what a checkpoint keeps."""
        with self.applied():
            return self.state_dict(), read()

    def load_state_dict(self, state):
        self.average.load_state_dict(state)
        self.average.shadow_params = [s.to(p.device) for s, p in zip(self.average.shadow_params, self.parameters)]


def make_ema(train_cfg, parameters):
    return AdapterEMA(parameters, train_cfg["ema_decay"]) if train_cfg.get("ema") else NoEMA()

