"""GPU utilisation and memory through NVML (the nvidia-ml-py package, `pynvml`). On a machine without an
NVIDIA driver NVML does not initialise, no collector is registered, and no GPU series appear: the metrics
are absent, never zeros that would read as an idle GPU."""

import logging
from collections.abc import Iterator
from types import ModuleType

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_log = logging.getLogger(__name__)


class GpuCollector(Collector):
    """Reads every GPU NVML shows this process (a container sees the ones it was given) at scrape time."""

    def __init__(self, nvml: ModuleType) -> None:
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    @classmethod
    def try_create(cls, nvml: ModuleType | None = None) -> "GpuCollector | None":
        """A collector when NVML initialises and shows at least one GPU; None otherwise (CPU machines)."""
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            collector = cls(nvml)
        except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU to report
            _log.debug("no GPU metrics: NVML unavailable (%s)", error)
            return None
        return collector if collector._handles else None

    def collect(self) -> Iterator[Metric]:
        utilization = GaugeMetricFamily("pdserve_gpu_utilization_ratio",
                                        "Fraction of the last sample period a kernel ran on the GPU", labels=["gpu"])
        used = GaugeMetricFamily("pdserve_gpu_memory_used_bytes", "GPU memory in use (all processes)", labels=["gpu"])
        total = GaugeMetricFamily("pdserve_gpu_memory_total_bytes", "GPU memory installed", labels=["gpu"])
        for index, handle in enumerate(self._handles):
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except self._nvml.NVMLError as error:
                _log.warning("GPU %d: NVML read failed: %s", index, error)
                continue
            utilization.add_metric([str(index)], rates.gpu / 100.0)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
        yield from (utilization, used, total)
