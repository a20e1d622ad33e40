"""What one epoch of training reports, from one set of numbers: the progress line (per step the
last value and the epoch's mean of everything the step reports, step and data-loading times, the
learning rate, the throughput of all processes and the time left) and the TensorBoard scalars
(train/<name> means and train/lr)."""

import datetime
import time


class Series:
    """The last value and the mean of a sequence of numbers."""

    def __init__(self):
        self.last = 0.0
        self.total = 0.0
        self.count = 0

    def add(self, value):
        self.last = float(value)
        self.total += self.last
        self.count += 1

    @property
    def mean(self):
        return self.total / self.count if self.count else 0.0


class EpochProgress:
    """Call loaded() when a batch has arrived and stepped(...) when its training step is done."""

    def __init__(self, epoch, max_epoch, num_batches, print_freq, processes=1, clock=time.time):
        self.epoch, self.max_epoch, self.num_batches = epoch, max_epoch, num_batches
        self.print_freq, self.processes = print_freq, processes
        self.values = {}
        self.step_time, self.data_time = Series(), Series()
        self.images = 0
        self.steps = 0
        self.lr = 0.0
        self._clock = clock
        self._mark = clock()

    def loaded(self):
        self.data_time.add(self._clock() - self._mark)

    def stepped(self, summary, images, lr):
        """summary: {name: number} of the step; images: this process's batch size."""
        now = self._clock()
        self.step_time.add(now - self._mark)
        self._mark = now
        self.steps += 1
        self.images += images * self.processes
        self.lr = lr
        for name, value in summary.items():
            self.values.setdefault(name, Series()).add(value)

    @property
    def global_step(self):
        """The step's index counted over all epochs (TensorBoard's x axis)."""
        return self.epoch * self.num_batches + self.steps - 1

    def due(self):
        """Whether this step's progress line is printed (every print_freq steps; every step of a short epoch)."""
        return self.steps % self.print_freq == 0 or self.num_batches < self.print_freq

    def line(self):
        remaining = self.num_batches - self.steps + (self.max_epoch - self.epoch - 1) * self.num_batches
        values = " ".join(f"{name} {series.last:.4f} ({series.mean:.4f})" for name, series in self.values.items())
        step, data = self.step_time, self.data_time
        return (
            f"epoch [{self.epoch + 1}/{self.max_epoch}] batch [{self.steps}/{self.num_batches}] "
            f"time {step.last:.3f} ({step.mean:.3f}) data {data.last:.3f} ({data.mean:.3f}) {values} "
            f"lr {self.lr:.4e} images/s {self.images / max(step.total, 1e-9):.1f} "
            f"eta {datetime.timedelta(seconds=int(step.mean * remaining))}"
        )

    def scalars(self):
        """{tag: value} for TensorBoard at global_step."""
        return {**{f"train/{name}": series.mean for name, series in self.values.items()}, "train/lr": self.lr}
