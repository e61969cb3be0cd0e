# Process and port helpers the bench scripts share: `source benches/lib.sh` after `cd` to the
# repository's root. Messages name the script that sourced this.

# Whether PID runs (a zombie, exited but not yet reaped, does not).
alive() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

# TERM, up to 10 s to exit (herald drains and closes its connections first), then KILL.
stop_pid() {
    local pid=$1 i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 100); do alive "$pid" || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

# Until something accepts on 127.0.0.1:PORT, for up to 10 s.
wait_port() {
    local port=$1 i
    for i in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "${0##*/}: nothing listens on port $port" >&2
    return 1
}

# A port the kernel just handed out, so free a moment ago.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
