"""The engine's command line run in a child process for the Slicer module (see BackgroundRun)."""

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from typing import List, Optional

import slicer

import LungGradCAMLib
from LungGradCAMLib.core.errors import CancelledError, LungGradCAMError

#: The folder that holds LungGradCAMLib: the child process imports the same engine as Slicer.
ENGINE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(LungGradCAMLib.__file__)))


#
# BackgroundRun
#


class BackgroundRun:
    """``lunggradcam run`` on a CT of the scene in a child process, as SlicerTotalSegmentator runs
    its engine: Slicer stays responsive, and a crash or an out-of-memory of torch ends the child,
    not Slicer. The child reports progress as JSON lines (``--progress json``); :meth:`poll` reads
    them without waiting, :meth:`cancel` stops the child (SIGTERM: it removes its temporaries),
    :meth:`result` loads its outputs into nodes when it has ended. Everything it writes is in a
    temporary folder of its own, removed at the end."""

    def __init__(self, command: List[str], folder: str, inputVolume, outputNodes: tuple) -> None:
        self.command, self.folder, self.inputVolume, self.outputNodes = command, folder, inputVolume, outputNodes
        self.out = os.path.join(folder, "result")
        self.estimate: Optional[dict] = None  # the heat map's estimated cost, when the child reported it
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._log: List[str] = []  # the child's other output lines: its error message, a traceback
        self._cancelled = False
        pythonPath = os.pathsep.join(p for p in (ENGINE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        self.process = slicer.util.launchConsoleProcess(command, updateEnvironment={"PYTHONPATH": pythonPath})
        self._reader = threading.Thread(target=self._read, name="LungGradCAM-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # stdout and stderr together (launchConsoleProcess)
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                self._events.put(event)
            elif line.strip():
                self._log.append(line.rstrip())
        self.process.stdout.close()

    def poll(self) -> List[dict]:
        """The child's events since the last call (``progress``, ``estimate``, ``done``), without waiting."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            if event["event"] == "estimate":
                self.estimate = event
            events.append(event)

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` stopped it."""
        return self._cancelled

    @property
    def running(self) -> bool:
        return self.process.poll() is None or self._reader.is_alive()

    def cancel(self) -> None:
        """Stop the child: SIGTERM (it removes its temporaries), then SIGKILL after 10 s."""
        self._cancelled = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        self._cleanup()

    def wait(self, onEvent=None, timeout: Optional[float] = None) -> None:
        """Wait for the child to end (the Python console's way), calling ``onEvent(event)`` per event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            for event in self.poll():
                if onEvent is not None:
                    onEvent(event)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise LungGradCAMError(f"the explanation did not end within {timeout:.0f} s and was stopped")
            time.sleep(0.05)
        for event in self.poll():
            if onEvent is not None:
                onEvent(event)

    def result(self):
        """The outputs of a child that has ended, as nodes (LungGradCAMLib.mrml.NodeResult). Raises
        CancelledError after :meth:`cancel` or when the child stopped before a costly heat map
        (``--max-estimate``), LungGradCAMError with the child's own message when it failed."""
        from LungGradCAMLib import mrml
        from LungGradCAMLib.pipeline.outputs import read_run

        if self.running:
            raise LungGradCAMError("the explanation is still running")
        try:
            code = self.process.returncode
            if self._cancelled:
                raise CancelledError("cancelled")
            if self.estimate is not None and self.estimate.get("stopped"):
                raise CancelledError(f"not started: {self.estimate['text']}")
            if code != 0:
                raise LungGradCAMError(self.failure(code))
            explanation, segmentation = read_run(self.out)
            return mrml.result_to_nodes(self.inputVolume, explanation, segmentation, *self.outputNodes)
        finally:
            self._cleanup()

    def failure(self, code: int) -> str:
        """What went wrong, from the child's exit status and its last words."""
        prefix = "lunggradcam run: error: "
        start = next((n for n in range(len(self._log) - 1, -1, -1) if self._log[n].startswith(prefix)), None)
        if start is not None:  # the message and its further lines (e.g. the series to choose from)
            return "\n".join([self._log[start][len(prefix) :]] + self._log[start + 1 :])
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return (
                f"the explanation process ended unexpectedly ({name}{', most likely out of memory' if -code == 9 else ''}); "
                "Slicer is not affected. Try a smaller batch size or the CPU."
            )
        return f"the explanation process failed (exit status {code}): " + " | ".join(self._log[-3:])

    def _cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
