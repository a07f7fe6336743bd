"""Watches a training run and turns GUIDE.md section 5's signs of problems into warnings.

The trainer calls on_log with each metrics line and on_samples with each set of sample images;
each returns a list of warnings (plain-language strings) for the log, progress and summary."""


class Monitor:
    def __init__(self, config):
        self.config = config
        self.warnings = []

    def on_log(self, line):
        return []

    def on_samples(self, step, images):
        return []

    def finish(self):
        return []
