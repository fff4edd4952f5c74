"""Interactive consoles on a node: terminals (a VM's serial pty, a shell in a container) bridged
to Redis streams by a hub process, and non-interactive exec.  See docs/console.md."""
