#!/usr/bin/env python3
"""Drive vspc-client under a pseudo-terminal (run by tests/client.rs).

usage: client_pty.py CLIENT ADMIN_PORT VM

The Rust test plays the VM and the admin; this script plays the user at a
terminal. Each run starts

    sh -c 'stty -g; CLIENT -a PORT VM; echo EXIT=$?; stty -g'

on a new pty and checks that the two `stty -g` lines are equal (the client
restored the terminal) and that EXIT=0.

Run 1: wait for the VM's "hello-from-vm-1", type "typed-1" (raw mode: not
echoed), Ctrl-] -> "vspc> ", "continue", type "typed-2", Ctrl-] -> "vspc> ",
"quit". Prints "MARK run1-done", then waits for a "go" line on stdin.

Run 2: wait for "hello-from-vm-2", print "MARK run2-ready"; the Rust side
clears the VM's consoles; expect "connection closed by the server".

Run 3: once the terminal is raw, Ctrl-] -> "vspc> ", then Ctrl-D (end of
input) must quit.

Any failure prints "FAIL: why" and the terminal transcript and exits 1.
Python standard library only.
"""

import os
import pty
import select
import sys
import termios
import time

STEP = 5.0  # seconds allowed for each step


def mark(name):
    print("MARK " + name, flush=True)


class Run:
    """One shell on a new pseudo-terminal, and everything it wrote."""

    def __init__(self, client, port, vm):
        script = 'stty -g; "$0" -a "$1" "$2"; echo EXIT=$?; stty -g'
        argv = ["sh", "-c", script, client, port, vm]
        pid, fd = pty.fork()
        if pid == 0:
            try:
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        self.pid = pid
        self.fd = fd
        self.out = b""
        self.eof = False
        self.status = None

    def fail(self, why):
        print("FAIL: " + why, flush=True)
        print("terminal transcript: %r" % self.out, flush=True)
        try:
            os.kill(self.pid, 9)
        except OSError:
            pass
        sys.exit(1)

    def pump(self, timeout):
        """Read what the terminal has, waiting up to timeout seconds."""
        if self.eof:
            time.sleep(min(timeout, 0.05))
            return
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: every process on the slave side is gone
            data = b""
        if data:
            self.out += data
        else:
            self.eof = True

    def expect(self, needle, start, what):
        """Wait for needle at or after offset start; return its offset."""
        deadline = time.monotonic() + STEP
        while True:
            at = self.out.find(needle, start)
            if at >= 0:
                return at
            left = deadline - time.monotonic()
            if left <= 0 or (self.eof and self.out.find(needle, start) < 0):
                self.fail("no %s (%r) within %.0fs" % (what, needle, STEP))
            self.pump(left)

    def send(self, data):
        os.write(self.fd, data)

    def wait_raw(self):
        """Wait until the client has put the terminal in raw mode."""
        deadline = time.monotonic() + STEP
        while termios.tcgetattr(self.fd)[3] & termios.ICANON:
            if time.monotonic() > deadline:
                self.fail("the terminal never went raw")
            self.pump(0.02)

    def check_mode(self, raw, when):
        """The slave's line discipline (tcgetattr on the master reports it)
        is raw (no ICANON, no ECHO) or cooked, as wanted."""
        lflag = termios.tcgetattr(self.fd)[3]
        cooked_bits = lflag & (termios.ICANON | termios.ECHO)
        if raw and cooked_bits:
            self.fail("terminal not in raw mode %s (lflag %#x)" % (when, lflag))
        if not raw and cooked_bits != termios.ICANON | termios.ECHO:
            self.fail("terminal not cooked %s (lflag %#x)" % (when, lflag))

    def wait_exit(self):
        deadline = time.monotonic() + STEP
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.status = status
                break
            if time.monotonic() > deadline:
                self.fail("the shell did not exit within %.0fs" % STEP)
            self.pump(0.05)
        # Collect what is left in the pty.
        end = time.monotonic() + 1.0
        while not self.eof and time.monotonic() < end:
            self.pump(0.05)
        os.close(self.fd)

    def check_restored(self):
        """The two stty -g lines are equal and the client exited 0."""
        lines = [l.strip(b"\r") for l in self.out.split(b"\n")]
        stty = [l for l in lines if is_stty(l)]
        exits = [l for l in lines if l.startswith(b"EXIT=")]
        if len(stty) != 2:
            self.fail("wanted two stty -g lines, got %r" % stty)
        if stty[0] != stty[1]:
            self.fail("terminal not restored:\n  before %r\n  after  %r" % (stty[0], stty[1]))
        if exits != [b"EXIT=0"]:
            self.fail("wanted EXIT=0, got %r" % exits)


def is_stty(line):
    """A `stty -g` line: many colon-separated hex numbers."""
    parts = line.split(b":")
    if len(parts) < 10:
        return False
    return all(p and all(c in b"0123456789abcdefABCDEF" for c in p) for p in parts)


def wait_go():
    deadline = time.monotonic() + 3 * STEP
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sys.stdin], [], [], deadline - time.monotonic())
        if ready:
            line = sys.stdin.readline()
            if line.strip() == "go":
                return
            if not line:
                break
    print("FAIL: no 'go' from the test", flush=True)
    sys.exit(1)


def main():
    if len(sys.argv) != 4:
        print("usage: client_pty.py CLIENT ADMIN_PORT VM", file=sys.stderr)
        sys.exit(2)
    client, port, vm = sys.argv[1:]
    # Run 1: the escape menu, continue, quit.
    r = Run(client, port, vm)
    r.expect(b"hello-from-vm-1", 0, "VM output")
    r.check_mode(raw=True, when="in the session")
    pos = len(r.out)
    r.send(b"typed-1")
    time.sleep(0.2)
    r.send(b"\x1d")
    at = r.expect(b"vspc> ", pos, "escape prompt")
    if b"typed-1" in r.out:
        r.fail("'typed-1' was echoed: the terminal was not in raw mode")
    r.check_mode(raw=False, when="at the escape prompt")
    pos = at + 1
    r.send(b"continue\r")
    time.sleep(0.3)
    r.send(b"typed-2")
    time.sleep(0.2)
    r.send(b"\x1d")
    at = r.expect(b"vspc> ", pos, "second escape prompt")
    r.send(b"quit\r")
    r.expect(b"EXIT=", at, "end of the client")
    r.wait_exit()
    r.check_restored()
    mark("run1-done")

    wait_go()

    # Run 2: the server closes the session.
    r = Run(client, port, vm)
    r.expect(b"hello-from-vm-2", 0, "VM output")
    mark("run2-ready")
    at = r.expect(b"connection closed by the server", 0, "the close notice")
    r.expect(b"EXIT=", at, "end of the client")
    r.wait_exit()
    r.check_restored()

    # Run 3: end of input (Ctrl-D) at the escape prompt quits. The read
    # that was waiting when the prompt appeared began in raw mode; the
    # client must still see the Ctrl-D.
    r = Run(client, port, vm)
    r.wait_raw()
    pos = len(r.out)
    r.send(b"\x1d")
    at = r.expect(b"vspc> ", pos, "escape prompt")
    r.send(b"\x04")
    r.expect(b"EXIT=", at, "end of the client after Ctrl-D")
    r.wait_exit()
    r.check_restored()
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
