/**
 * @module Silence bounds judged after the input that waited behind them. Each turn of Node's event loop runs its due
 * timers before it reads its sockets, so once this process itself has been held past a bound (a long synchronous task,
 * a starved CPU, a stopped process), the bound's timer fires before the bytes that arrived meanwhile are read: the
 * process's own pause would read as S3's silence, and a range or request still receiving would be cut. A bound that
 * runs out is therefore judged once more after the loop's next read of its sockets (setImmediate: the check phase
 * follows the poll); anything read or written by then, it was not silence.
 */
import type http from 'node:http';
import type net from 'node:net';

export interface SilenceTimer {
  /** Something was received or sent: the bound starts over. */
  beat(): void;
  /** The bound no longer applies; `silent` is not called after this. */
  clear(): void;
}

/** Calls `silent` once `ms` have passed without a beat(), judged as the module says. Not again unless beaten. */
export function silenceTimer(ms: number, silent: () => void): SilenceTimer {
  let beats = 0;
  let check: NodeJS.Immediate | undefined;
  const timer = setTimeout(() => {
    const seen = beats;
    check = setImmediate(() => {
      check = undefined;
      // A beat since the timer fired has set it again.
      if (beats === seen) silent();
    });
  }, ms);
  return {
    beat() {
      beats++;
      timer.refresh();
    },
    // A cleared timer is not set again by refresh() (a beat after this).
    clear() {
      clearTimeout(timer);
      if (check !== undefined) clearImmediate(check);
    },
  };
}

/**
 * Calls `silent` once nothing has been sent or received on `req`'s socket for `ms`, from the moment it has one (its
 * connection included: a connect that hangs is silence too), judged as the module says. A write still draining to the
 * kernel counts as activity, as in req.setTimeout, whose timer is the socket's own inactivity timer; not
 * req.setTimeout itself: its listener is once only, so a timeout found to be no silence could not be watched for
 * again. Called at most once per silence; never after `req` closes.
 */
export function boundSocketSilence(req: http.ClientRequest, ms: number, silent: () => void): void {
  const watch = (socket: net.Socket) => {
    let check: NodeJS.Immediate | undefined;
    // A write the kernel takes in steps reaches JavaScript only when it ends; meanwhile only its queue tells, which Node
    // compares across a period (net.js _onTimeout). Under TLS that queue is the TLS wrapper's, which stands still for
    // the whole write: the TCP handle beneath it (_parent) is the one that drains.
    const handle = () => (socket as unknown as { _handle?: { writeQueueSize?: number; _parent?: { writeQueueSize?: number } } })._handle;
    const queue = () => `${handle()?.writeQueueSize} ${handle()?._parent?.writeQueueSize}`;
    const activity = () => `${socket.bytesRead} ${socket.bytesWritten} ${queue()}`;
    let lastQueue = queue();
    const again = () => {
      lastQueue = queue();
      socket.setTimeout(ms);
    };
    const onTimeout = () => {
      if (check !== undefined) return;
      // The queue moved since the last look: a write drained during the period (so a stopped one is told within two).
      if (queue() !== lastQueue) return again();
      const seen = activity();
      check = setImmediate(() => {
        check = undefined;
        if (activity() === seen) silent();
        // A read, or a write handed to the kernel, has set the socket's timer again; a write queue that drained has
        // not, and a reader that stops now would be bounded by nothing: set it again.
        else again();
      });
    };
    socket.setTimeout(ms);
    socket.on('timeout', onTimeout);
    // A socket kept alive goes back to its agent: to its pool, which sets the agent's own timeout on it
    // (Agent#keepSocketAlive), or straight to a request waiting for one, which would keep this bound with no listener
    // (req.setTimeout's is cleared there too: _http_client.js responseKeepAlive).
    req.once('close', () => {
      socket.off('timeout', onTimeout);
      if (check !== undefined) clearImmediate(check);
      socket.setTimeout(0);
    });
  };
  if (req.socket) watch(req.socket);
  else req.once('socket', watch);
}
