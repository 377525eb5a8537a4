/*
 * stuck-fs: a FUSE file system for the tests, spoken directly over /dev/fuse (no libfuse, no fusermount: neither is
 * installed where the tests run). It passes every call through to a backing folder until told to stop answering; from
 * then on it holds every request unanswered, as an NFS server gone away on a hard mount: every call on the mount, a
 * stat included, waits for good. As on NFS (TASK_KILLABLE waits) a caller that is dying (a fatal signal pending, or
 * exiting) gets its call failed (EINTR), and only such a one: the kernel's own wait for a FUSE answer is not killable
 * once the daemon has read the request, and never for the flush of a close (a process with a file open on the mount
 * could not exit). A flush of a file not opened for writing is answered at once, as NFS's close needs no server then.
 *
 *   stuck-fs BACKING MOUNTPOINT [--hang-after OP:NAME [--times N]] [--eio OP:NAME [--eio-times N] [--eio-errno N]] [--delay-ms N] [--log] [--probe]
 *
 * Prints "ready" once mounted and answering, "hung" once it stops answering. SIGUSR1: stop answering now. SIGUSR2:
 * answer again, at once (no --delay-ms any more), and fail no more requests with EIO. --hang-after OP:NAME: answer the first request OP (lookup, getattr, open, read, write, create, mkdir,
 * unlink, rename, setattr, fsync, opendir, readdir, access, any) naming NAME (the name looked up or created, or the
 * node's own name; * for any), then stop; with --times N, the Nth such request. --eio OP:NAME: fail the first such
 * request with EIO (a disk or network block device's read error), then pass through again; with --eio-times N, the
 * first N; with --eio-errno N, with that errno instead (1: EPERM, as a volume that refuses a chmod). --delay-ms: each answer that long late (a slow but healthy server). SIGTERM: the connection is
 * closed (calls still waiting fail with ENOTCONN), the mount detached, and the daemon exits. It dies with the process
 * that started it (PR_SET_PDEATHSIG), leaving a mount that fails every call until it is detached (umount -l).
 * --probe: mount, answer the kernel's first request, unmount and exit 0 (whether FUSE mounts work here).
 *
 * One thread: each call on the backing folder is short, and the kernel queues what comes meanwhile.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* The backing folder's file system fails nothing we ask of it: a bigger buffer than the largest write (128 KiB). */
#define MAX_WRITE (128 * 1024)
#define BUF_SIZE (MAX_WRITE + 64 * 1024)
/* How often held requests' callers are looked at, to fail those that are dying. */
#define REAP_MS 50

struct node {
  uint64_t parent; /* 0: no longer named (unlinked, or replaced by a rename) */
  char *name;
  ino_t ino;
  uint64_t nlookup;
};

struct dirbuf {
  size_t n;
  struct {
    ino_t ino;
    unsigned char type;
    char *name;
  } *e;
};

static struct node *nodes; /* index = nodeid - 1; nodeid 1 is the root */
static size_t n_nodes;
static int backing_fd;
static int fuse_fd = -1;
static const char *mountpoint;
static volatile sig_atomic_t hung, term;
/* --eio: requests matching it that are still to fail with EIO (--eio-times); SIGUSR2 clears it. */
static char eio_op[32], eio_name[256];
static long eio_times = 1;
static int eio_errno = EIO;
/* --delay-ms; SIGUSR2 clears it. */
static volatile sig_atomic_t delay_ms;
static int logging, probe;
static char trip_op[32], trip_name[256];
/* How many requests matching --hang-after are answered before it stops (--times). */
static long trip_times = 1;

/* Requests read while hung, unanswered (copied whole: answered in order if told to answer again). */
struct held {
  char *buf;
  size_t n;
};
static struct held *held;
static size_t n_held;

static void on_signal(int sig) {
  if (sig == SIGUSR1) hung = 1;
  else if (sig == SIGUSR2) hung = 0, eio_op[0] = 0, delay_ms = 0;
  else term = 1;
}

static void say(const char *line) {
  printf("%s\n", line);
  fflush(stdout);
}

/* The node's path relative to the backing folder ("." for the root); NULL when it has no name any more. */
static char *node_path(uint64_t id, char *buf, size_t size) {
  char tmp[4096];
  size_t len = 0;
  tmp[0] = 0;
  while (id != FUSE_ROOT_ID) {
    if (id == 0 || id > n_nodes || nodes[id - 1].parent == 0) return NULL;
    size_t l = strlen(nodes[id - 1].name);
    if (len + l + 1 >= sizeof tmp) return NULL;
    memmove(tmp + l + 1, tmp, len + 1);
    memcpy(tmp, nodes[id - 1].name, l);
    tmp[l] = len ? '/' : 0;
    len += l + (len ? 1 : 0);
    id = nodes[id - 1].parent;
  }
  snprintf(buf, size, "%s", len ? tmp : ".");
  return buf;
}

static int child_path(uint64_t dir, const char *name, char *buf, size_t size) {
  char d[4096];
  if (!node_path(dir, d, sizeof d)) return -ENOENT;
  if ((size_t)snprintf(buf, size, "%s/%s", d, name) >= size) return -ENAMETOOLONG;
  return 0;
}

static uint64_t find_child(uint64_t dir, const char *name) {
  for (size_t i = 1; i < n_nodes; i++)
    if (nodes[i].parent == dir && nodes[i].name && strcmp(nodes[i].name, name) == 0) return i + 1;
  return 0;
}

/* The node for `name` in `dir` whose backing inode is `ino`: found again (and named so) or new. */
static uint64_t node_for(uint64_t dir, const char *name, ino_t ino) {
  uint64_t id = 0;
  for (size_t i = 1; i < n_nodes && !id; i++)
    if (nodes[i].parent && nodes[i].ino == ino) id = i + 1;
  if (!id) {
    nodes = realloc(nodes, (n_nodes + 1) * sizeof *nodes);
    if (!nodes) abort();
    nodes[n_nodes] = (struct node){0};
    id = ++n_nodes;
  }
  uint64_t other = find_child(dir, name);
  if (other && other != id) nodes[other - 1].parent = 0;
  free(nodes[id - 1].name);
  nodes[id - 1].name = strdup(name);
  nodes[id - 1].parent = dir;
  nodes[id - 1].ino = ino;
  nodes[id - 1].nlookup++;
  return id;
}

static void fill_attr(struct fuse_attr *a, const struct stat *st, uint64_t id) {
  memset(a, 0, sizeof *a);
  a->ino = id;
  a->size = st->st_size;
  a->blocks = st->st_blocks;
  a->atime = st->st_atim.tv_sec;
  a->atimensec = st->st_atim.tv_nsec;
  a->mtime = st->st_mtim.tv_sec;
  a->mtimensec = st->st_mtim.tv_nsec;
  a->ctime = st->st_ctim.tv_sec;
  a->ctimensec = st->st_ctim.tv_nsec;
  a->mode = st->st_mode;
  a->nlink = st->st_nlink;
  a->uid = st->st_uid;
  a->gid = st->st_gid;
  a->rdev = st->st_rdev;
  a->blksize = st->st_blksize;
}

static void reply(uint64_t unique, int error, const void *data, size_t len) {
  struct fuse_out_header h = {.len = sizeof h + (error ? 0 : len), .error = error, .unique = unique};
  struct iovec iov[2] = {{&h, sizeof h}, {(void *)data, error ? 0 : len}};
  long ms = delay_ms;
  if (ms > 0) nanosleep(&(struct timespec){ms / 1000, (ms % 1000) * 1000000L}, NULL);
  /* ENOENT: the caller was interrupted meanwhile (its request is gone). */
  if (writev(fuse_fd, iov, 2) < 0 && errno != ENOENT && logging) fprintf(stderr, "stuck-fs: reply: %s\n", strerror(errno));
}

static int reply_entry(uint64_t unique, uint64_t dir, const char *name, const char *path) {
  struct stat st;
  if (fstatat(backing_fd, path, &st, AT_SYMLINK_NOFOLLOW) < 0) return -errno;
  struct fuse_entry_out e = {0};
  e.nodeid = node_for(dir, name, st.st_ino);
  /* No caching: every look-up and stat reaches the daemon, as on NFS with actimeo=0 (and a hang is met at once). */
  fill_attr(&e.attr, &st, e.nodeid);
  reply(unique, 0, &e, sizeof e);
  return 0;
}

static void reply_attr(uint64_t unique, uint64_t id, const struct stat *st) {
  struct fuse_attr_out o = {0};
  fill_attr(&o.attr, st, id);
  reply(unique, 0, &o, sizeof o);
}

static const char *op_name(uint32_t op) {
  switch (op) {
  case FUSE_LOOKUP: return "lookup";
  case FUSE_GETATTR: return "getattr";
  case FUSE_SETATTR: return "setattr";
  case FUSE_OPEN: return "open";
  case FUSE_READ: return "read";
  case FUSE_WRITE: return "write";
  case FUSE_CREATE: return "create";
  case FUSE_MKDIR: return "mkdir";
  case FUSE_UNLINK: return "unlink";
  case FUSE_RMDIR: return "rmdir";
  case FUSE_RENAME: case FUSE_RENAME2: return "rename";
  case FUSE_FSYNC: return "fsync";
  case FUSE_FLUSH: return "flush";
  case FUSE_RELEASE: return "release";
  case FUSE_OPENDIR: return "opendir";
  case FUSE_READDIR: return "readdir";
  case FUSE_RELEASEDIR: return "releasedir";
  case FUSE_STATFS: return "statfs";
  case FUSE_ACCESS: return "access";
  case FUSE_LINK: return "link";
  case FUSE_SYMLINK: return "symlink";
  case FUSE_READLINK: return "readlink";
  case FUSE_FORGET: return "forget";
  case FUSE_BATCH_FORGET: return "batch_forget";
  default: return "other";
  }
}

/* The name a request is about: the one it looks up or creates, else its node's own. */
static const char *request_name(const struct fuse_in_header *h, const char *body) {
  switch (h->opcode) {
  case FUSE_LOOKUP: case FUSE_UNLINK: case FUSE_RMDIR: return body;
  case FUSE_CREATE: return body + sizeof(struct fuse_create_in);
  case FUSE_MKDIR: return body + sizeof(struct fuse_mkdir_in);
  case FUSE_RENAME: return body + sizeof(struct fuse_rename_in);
  case FUSE_RENAME2: return body + sizeof(struct fuse_rename2_in);
  default: return h->nodeid >= 1 && h->nodeid <= n_nodes && nodes[h->nodeid - 1].name ? nodes[h->nodeid - 1].name : "";
  }
}

static int do_setattr(uint64_t id, const struct fuse_setattr_in *in, struct stat *st) {
  char p[4096];
  int fh = in->valid & FATTR_FH ? (int)in->fh : -1;
  if (fh < 0 && !node_path(id, p, sizeof p)) return -ENOENT;
  if (in->valid & FATTR_MODE && (fh >= 0 ? fchmod(fh, in->mode) : fchmodat(backing_fd, p, in->mode, 0)) < 0) return -errno;
  if (in->valid & (FATTR_UID | FATTR_GID)) {
    uid_t u = in->valid & FATTR_UID ? in->uid : (uid_t)-1;
    gid_t g = in->valid & FATTR_GID ? in->gid : (gid_t)-1;
    if ((fh >= 0 ? fchown(fh, u, g) : fchownat(backing_fd, p, u, g, AT_SYMLINK_NOFOLLOW)) < 0) return -errno;
  }
  if (in->valid & FATTR_SIZE) {
    int fd = fh >= 0 ? fh : openat(backing_fd, p, O_WRONLY);
    if (fd < 0) return -errno;
    int r = ftruncate(fd, in->size);
    int err = errno;
    if (fh < 0) close(fd);
    if (r < 0) return -err;
  }
  if (in->valid & (FATTR_ATIME | FATTR_MTIME)) {
    struct timespec t[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
    if (in->valid & FATTR_ATIME) t[0] = in->valid & FATTR_ATIME_NOW ? (struct timespec){0, UTIME_NOW} : (struct timespec){in->atime, in->atimensec};
    if (in->valid & FATTR_MTIME) t[1] = in->valid & FATTR_MTIME_NOW ? (struct timespec){0, UTIME_NOW} : (struct timespec){in->mtime, in->mtimensec};
    if ((fh >= 0 ? futimens(fh, t) : utimensat(backing_fd, p, t, AT_SYMLINK_NOFOLLOW)) < 0) return -errno;
  }
  if ((fh >= 0 ? fstat(fh, st) : fstatat(backing_fd, p, st, AT_SYMLINK_NOFOLLOW)) < 0) return -errno;
  return 0;
}

static int do_readdir(uint64_t unique, const struct fuse_read_in *in) {
  struct dirbuf *d = (struct dirbuf *)(uintptr_t)in->fh;
  static char out[BUF_SIZE];
  size_t len = 0, max = in->size < sizeof out ? in->size : sizeof out;
  for (size_t i = in->offset; i < d->n; i++) {
    size_t nl = strlen(d->e[i].name), sz = FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + nl);
    if (len + sz > max) break;
    struct fuse_dirent *de = (struct fuse_dirent *)(out + len);
    memset(de, 0, sz);
    de->ino = d->e[i].ino;
    de->off = i + 1;
    de->namelen = nl;
    de->type = d->e[i].type;
    memcpy(de->name, d->e[i].name, nl);
    len += sz;
  }
  reply(unique, 0, out, len);
  return 0;
}

static int do_opendir(uint64_t unique, uint64_t id, const char *p) {
  int fd = openat(backing_fd, p, O_RDONLY | O_DIRECTORY);
  if (fd < 0) return -errno;
  DIR *dir = fdopendir(fd);
  if (!dir) {
    close(fd);
    return -errno;
  }
  struct dirbuf *d = calloc(1, sizeof *d);
  struct dirent *de;
  while ((de = readdir(dir))) {
    d->e = realloc(d->e, (d->n + 1) * sizeof *d->e);
    d->e[d->n].ino = strcmp(de->d_name, ".") == 0 ? id : de->d_ino;
    d->e[d->n].type = de->d_type;
    d->e[d->n].name = strdup(de->d_name);
    d->n++;
  }
  closedir(dir);
  struct fuse_open_out o = {.fh = (uint64_t)(uintptr_t)d};
  reply(unique, 0, &o, sizeof o);
  return 0;
}

static void forget(uint64_t id, uint64_t n) {
  if (id <= FUSE_ROOT_ID || id > n_nodes) return;
  struct node *nd = &nodes[id - 1];
  nd->nlookup = nd->nlookup > n ? nd->nlookup - n : 0;
  if (nd->nlookup == 0) {
    /* The id is never given again; its slot stays, nameless. */
    free(nd->name);
    nd->name = NULL;
    nd->parent = 0;
  }
}

/* One request; returns 1 when it was answered (or needs no answer), or a negative errno to answer with. */
static int handle(const struct fuse_in_header *h, const char *body) {
  char p[4096], q[4096];
  struct stat st;
  uint64_t id = h->nodeid;
  switch (h->opcode) {
  case FUSE_INIT: {
    const struct fuse_init_in *in = (const void *)body;
    struct fuse_init_out o = {0};
    o.major = FUSE_KERNEL_VERSION;
    o.minor = FUSE_KERNEL_MINOR_VERSION;
    o.max_readahead = in->max_readahead;
    /* Neither a writeback cache nor readdirplus: every write and look-up is a request of its own. */
    o.flags = in->flags & (FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES);
    o.max_background = 16;
    o.congestion_threshold = 12;
    o.max_write = MAX_WRITE;
    o.time_gran = 1;
    reply(h->unique, 0, &o, sizeof o);
    return 1;
  }
  case FUSE_LOOKUP: {
    int r = child_path(id, body, p, sizeof p);
    if (r == 0) r = reply_entry(h->unique, id, body, p);
    return r < 0 ? r : 1;
  }
  case FUSE_FORGET:
    forget(id, ((const struct fuse_forget_in *)body)->nlookup);
    return 1;
  case FUSE_BATCH_FORGET: {
    const struct fuse_batch_forget_in *in = (const void *)body;
    const struct fuse_forget_one *one = (const void *)(in + 1);
    for (uint32_t i = 0; i < in->count; i++) forget(one[i].nodeid, one[i].nlookup);
    return 1;
  }
  case FUSE_GETATTR: {
    const struct fuse_getattr_in *in = (const void *)body;
    if (in->getattr_flags & FUSE_GETATTR_FH) {
      if (fstat((int)in->fh, &st) < 0) return -errno;
    } else if (!node_path(id, p, sizeof p)) return -ENOENT;
    else if (fstatat(backing_fd, p, &st, AT_SYMLINK_NOFOLLOW) < 0) return -errno;
    reply_attr(h->unique, id, &st);
    return 1;
  }
  case FUSE_SETATTR: {
    int r = do_setattr(id, (const void *)body, &st);
    if (r < 0) return r;
    reply_attr(h->unique, id, &st);
    return 1;
  }
  case FUSE_READLINK: {
    if (!node_path(id, p, sizeof p)) return -ENOENT;
    ssize_t n = readlinkat(backing_fd, p, q, sizeof q);
    if (n < 0) return -errno;
    reply(h->unique, 0, q, n);
    return 1;
  }
  case FUSE_SYMLINK: {
    const char *name = body, *target = body + strlen(body) + 1;
    int r = child_path(id, name, p, sizeof p);
    if (r < 0) return r;
    if (symlinkat(target, backing_fd, p) < 0) return -errno;
    r = reply_entry(h->unique, id, name, p);
    return r < 0 ? r : 1;
  }
  case FUSE_MKNOD: {
    const struct fuse_mknod_in *in = (const void *)body;
    const char *name = (const char *)(in + 1);
    int r = child_path(id, name, p, sizeof p);
    if (r < 0) return r;
    if (mknodat(backing_fd, p, in->mode & ~in->umask, in->rdev) < 0) return -errno;
    r = reply_entry(h->unique, id, name, p);
    return r < 0 ? r : 1;
  }
  case FUSE_MKDIR: {
    const struct fuse_mkdir_in *in = (const void *)body;
    const char *name = (const char *)(in + 1);
    int r = child_path(id, name, p, sizeof p);
    if (r < 0) return r;
    if (mkdirat(backing_fd, p, in->mode & ~in->umask) < 0) return -errno;
    r = reply_entry(h->unique, id, name, p);
    return r < 0 ? r : 1;
  }
  case FUSE_UNLINK:
  case FUSE_RMDIR: {
    int r = child_path(id, body, p, sizeof p);
    if (r < 0) return r;
    if (unlinkat(backing_fd, p, h->opcode == FUSE_RMDIR ? AT_REMOVEDIR : 0) < 0) return -errno;
    uint64_t c = find_child(id, body);
    if (c) nodes[c - 1].parent = 0;
    reply(h->unique, 0, NULL, 0);
    return 1;
  }
  case FUSE_RENAME:
  case FUSE_RENAME2: {
    uint64_t newdir;
    unsigned flags = 0;
    const char *from;
    if (h->opcode == FUSE_RENAME) {
      newdir = ((const struct fuse_rename_in *)body)->newdir;
      from = body + sizeof(struct fuse_rename_in);
    } else {
      newdir = ((const struct fuse_rename2_in *)body)->newdir;
      flags = ((const struct fuse_rename2_in *)body)->flags;
      from = body + sizeof(struct fuse_rename2_in);
    }
    const char *to = from + strlen(from) + 1;
    int r = child_path(id, from, p, sizeof p);
    if (r == 0) r = child_path(newdir, to, q, sizeof q);
    if (r < 0) return r;
    if (renameat2(backing_fd, p, backing_fd, q, flags) < 0) return -errno;
    uint64_t moved = find_child(id, from), replaced = find_child(newdir, to);
    if (replaced && replaced != moved && !(flags & RENAME_EXCHANGE)) nodes[replaced - 1].parent = 0;
    if (flags & RENAME_EXCHANGE && replaced) {
      free(nodes[replaced - 1].name);
      nodes[replaced - 1].name = strdup(from);
      nodes[replaced - 1].parent = id;
    }
    if (moved) {
      free(nodes[moved - 1].name);
      nodes[moved - 1].name = strdup(to);
      nodes[moved - 1].parent = newdir;
    }
    reply(h->unique, 0, NULL, 0);
    return 1;
  }
  case FUSE_LINK: {
    const struct fuse_link_in *in = (const void *)body;
    const char *name = (const char *)(in + 1);
    int r = child_path(id, name, q, sizeof q);
    if (r < 0) return r;
    if (!node_path(in->oldnodeid, p, sizeof p)) return -ENOENT;
    if (linkat(backing_fd, p, backing_fd, q, 0) < 0) return -errno;
    /* The same inode under a second name: the kernel keeps the node it had. */
    if (fstatat(backing_fd, q, &st, AT_SYMLINK_NOFOLLOW) < 0) return -errno;
    struct fuse_entry_out e = {0};
    e.nodeid = in->oldnodeid;
    nodes[e.nodeid - 1].nlookup++;
    fill_attr(&e.attr, &st, e.nodeid);
    reply(h->unique, 0, &e, sizeof e);
    return 1;
  }
  case FUSE_OPEN: {
    const struct fuse_open_in *in = (const void *)body;
    if (!node_path(id, p, sizeof p)) return -ENOENT;
    int fd = openat(backing_fd, p, in->flags & ~(O_CREAT | O_EXCL | O_NOCTTY));
    if (fd < 0) return -errno;
    struct fuse_open_out o = {.fh = (uint64_t)fd};
    reply(h->unique, 0, &o, sizeof o);
    return 1;
  }
  case FUSE_CREATE: {
    const struct fuse_create_in *in = (const void *)body;
    const char *name = (const char *)(in + 1);
    int r = child_path(id, name, p, sizeof p);
    if (r < 0) return r;
    int fd = openat(backing_fd, p, in->flags | O_CREAT, in->mode & ~in->umask);
    if (fd < 0) return -errno;
    if (fstat(fd, &st) < 0) {
      r = -errno;
      close(fd);
      return r;
    }
    struct {
      struct fuse_entry_out e;
      struct fuse_open_out o;
    } out = {0};
    out.e.nodeid = node_for(id, name, st.st_ino);
    fill_attr(&out.e.attr, &st, out.e.nodeid);
    out.o.fh = (uint64_t)fd;
    reply(h->unique, 0, &out, sizeof out);
    return 1;
  }
  case FUSE_READ: {
    const struct fuse_read_in *in = (const void *)body;
    static char data[BUF_SIZE];
    ssize_t n = pread((int)in->fh, data, in->size < sizeof data ? in->size : sizeof data, in->offset);
    if (n < 0) return -errno;
    reply(h->unique, 0, data, n);
    return 1;
  }
  case FUSE_WRITE: {
    const struct fuse_write_in *in = (const void *)body;
    ssize_t n = pwrite((int)in->fh, in + 1, in->size, in->offset);
    if (n < 0) return -errno;
    struct fuse_write_out o = {.size = (uint32_t)n};
    reply(h->unique, 0, &o, sizeof o);
    return 1;
  }
  case FUSE_FLUSH:
  case FUSE_FSYNCDIR:
    reply(h->unique, 0, NULL, 0);
    return 1;
  case FUSE_FSYNC: {
    const struct fuse_fsync_in *in = (const void *)body;
    if ((in->fsync_flags & 1 ? fdatasync((int)in->fh) : fsync((int)in->fh)) < 0) return -errno;
    reply(h->unique, 0, NULL, 0);
    return 1;
  }
  case FUSE_RELEASE:
    close((int)((const struct fuse_release_in *)body)->fh);
    reply(h->unique, 0, NULL, 0);
    return 1;
  case FUSE_FALLOCATE: {
    const struct fuse_fallocate_in *in = (const void *)body;
    if (fallocate((int)in->fh, in->mode, in->offset, in->length) < 0) return -errno;
    reply(h->unique, 0, NULL, 0);
    return 1;
  }
  case FUSE_OPENDIR:
    if (!node_path(id, p, sizeof p)) return -ENOENT;
    return do_opendir(h->unique, id, p);
  case FUSE_READDIR:
    return do_readdir(h->unique, (const void *)body);
  case FUSE_RELEASEDIR: {
    struct dirbuf *d = (struct dirbuf *)(uintptr_t)((const struct fuse_release_in *)body)->fh;
    for (size_t i = 0; i < d->n; i++) free(d->e[i].name);
    free(d->e);
    free(d);
    reply(h->unique, 0, NULL, 0);
    return 1;
  }
  case FUSE_STATFS: {
    struct statvfs s;
    if (fstatvfs(backing_fd, &s) < 0) return -errno;
    struct fuse_statfs_out o = {.st = {.blocks = s.f_blocks, .bfree = s.f_bfree, .bavail = s.f_bavail, .files = s.f_files,
                                       .ffree = s.f_ffree, .bsize = s.f_bsize, .namelen = s.f_namemax, .frsize = s.f_frsize}};
    reply(h->unique, 0, &o, sizeof o);
    return 1;
  }
  case FUSE_ACCESS:
    if (!node_path(id, p, sizeof p)) return -ENOENT;
    if (faccessat(backing_fd, p, ((const struct fuse_access_in *)body)->mask, 0) < 0) return -errno;
    reply(h->unique, 0, NULL, 0);
    return 1;
  case FUSE_INTERRUPT:
    /* The call it names is answered soon anyway. */
    return 1;
  case FUSE_DESTROY:
    reply(h->unique, 0, NULL, 0);
    return 1;
  default:
    /* Extended attributes, locks (the kernel's own, local ones then), ioctl, poll, lseek, copy_file_range. */
    return -ENOSYS;
  }
}

/* Whether thread `tid` is dying (a fatal signal pending, exiting) or gone: what ends a TASK_KILLABLE wait on NFS. */
static int dying(uint32_t tid) {
  char path[64], buf[4096];
  snprintf(path, sizeof path, "/proc/%u/stat", tid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 1;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 1;
  buf[n] = 0;
  /* After the command's closing parenthesis: state, ppid, pgrp, session, tty_nr, tpgid, flags. */
  char *p = strrchr(buf, ')');
  char state = 0;
  unsigned long flags = 0;
  if (!p || sscanf(p + 1, " %c %*d %*d %*d %*d %*d %lu", &state, &flags) != 2) return 1;
  if (state == 'Z' || state == 'X' || flags & 0x4 /* PF_EXITING */) return 1;
  snprintf(path, sizeof path, "/proc/%u/status", tid);
  FILE *f = fopen(path, "re");
  if (!f) return 1;
  int fatal = 0;
  unsigned long long mask;
  while (fgets(buf, sizeof buf, f))
    if ((sscanf(buf, "SigPnd: %llx", &mask) == 1 || sscanf(buf, "ShdPnd: %llx", &mask) == 1) && mask & (1ULL << (SIGKILL - 1))) fatal = 1;
  fclose(f);
  return fatal;
}

/* Fails the held calls whose callers are dying; the others wait on. */
static void reap(void) {
  size_t kept = 0;
  for (size_t i = 0; i < n_held; i++) {
    const struct fuse_in_header *h = (const void *)held[i].buf;
    if (h->pid != 0 && dying(h->pid)) {
      if (logging) fprintf(stderr, "stuck-fs: %s failed: its caller %u is dying\n", op_name(h->opcode), h->pid);
      reply(h->unique, -EINTR, NULL, 0);
      free(held[i].buf);
    } else held[kept++] = held[i];
  }
  n_held = kept;
}

/* While hung: what is answered anyway (bookkeeping that waits for nothing, a flush with nothing to write), else held. */
static void hold(const char *buf, size_t n) {
  const struct fuse_in_header *h = (const void *)buf;
  const char *body = buf + sizeof *h;
  switch (h->opcode) {
  case FUSE_INTERRUPT:
    /* A signal that is not fatal does not end a wait on NFS either; a fatal one is seen by reap(). */
    return;
  case FUSE_FORGET:
  case FUSE_BATCH_FORGET:
    handle(h, body);
    return;
  case FUSE_FLUSH: {
    int fl = fcntl((int)((const struct fuse_flush_in *)body)->fh, F_GETFL);
    if (fl >= 0 && (fl & O_ACCMODE) == O_RDONLY) {
      reply(h->unique, 0, NULL, 0);
      return;
    }
    break;
  }
  default:
    break;
  }
  held = realloc(held, (n_held + 1) * sizeof *held);
  if (!held) abort();
  held[n_held].buf = malloc(n);
  if (!held[n_held].buf) abort();
  memcpy(held[n_held].buf, buf, n);
  held[n_held++].n = n;
}

static void unmount(const char *dir) {
  if (umount2(dir, MNT_DETACH) < 0 && errno != EINVAL && errno != ENOENT) fprintf(stderr, "stuck-fs: unmount %s: %s\n", dir, strerror(errno));
}

static void usage(void) {
  fprintf(stderr, "usage: stuck-fs BACKING MOUNTPOINT [--hang-after OP:NAME [--times N]] [--eio OP:NAME [--eio-times N] [--eio-errno N]] [--delay-ms N] [--log] [--probe]\n");
  exit(2);
}

/* Parses OP:NAME into op and name. */
static void op_spec(const char *spec, char *op, size_t op_size, char *name, size_t name_size) {
  const char *colon = strchr(spec, ':');
  if (!colon || (size_t)(colon - spec) >= op_size || strlen(colon + 1) >= name_size) usage();
  memcpy(op, spec, colon - spec);
  op[colon - spec] = 0;
  strcpy(name, colon + 1);
}

/* Whether request `h`, about `name`, is one that OP:NAME (op empty: none) names. */
static int matches(const char *op, const char *spec_name, const struct fuse_in_header *h, const char *name) {
  return op[0] && (strcmp(op, "any") == 0 || strcmp(op, op_name(h->opcode)) == 0) && (strcmp(spec_name, "*") == 0 || strcmp(spec_name, name) == 0);
}

int main(int argc, char **argv) {
  if (argc < 3) usage();
  for (int i = 3; i < argc; i++) {
    if (strcmp(argv[i], "--hang-after") == 0 && i + 1 < argc) op_spec(argv[++i], trip_op, sizeof trip_op, trip_name, sizeof trip_name);
    else if (strcmp(argv[i], "--times") == 0 && i + 1 < argc) {
      trip_times = atol(argv[++i]);
      if (trip_times < 1) usage();
    } else if (strcmp(argv[i], "--eio") == 0 && i + 1 < argc) op_spec(argv[++i], eio_op, sizeof eio_op, eio_name, sizeof eio_name);
    else if (strcmp(argv[i], "--eio-times") == 0 && i + 1 < argc) {
      eio_times = atol(argv[++i]);
      if (eio_times < 1) usage();
    } else if (strcmp(argv[i], "--eio-errno") == 0 && i + 1 < argc) {
      eio_errno = atoi(argv[++i]);
      if (eio_errno < 1) usage();
    } else if (strcmp(argv[i], "--delay-ms") == 0 && i + 1 < argc) delay_ms = (sig_atomic_t)atol(argv[++i]);
    else if (strcmp(argv[i], "--log") == 0) logging = 1;
    else if (strcmp(argv[i], "--probe") == 0) probe = 1;
    else usage();
  }
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() == 1) return 1;
  mountpoint = argv[2];
  backing_fd = open(argv[1], O_RDONLY | O_DIRECTORY);
  if (backing_fd < 0) {
    fprintf(stderr, "stuck-fs: %s: %s\n", argv[1], strerror(errno));
    return 1;
  }
  fuse_fd = open("/dev/fuse", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fuse_fd < 0) {
    fprintf(stderr, "stuck-fs: /dev/fuse: %s\n", strerror(errno));
    return 1;
  }
  struct stat root;
  if (fstat(backing_fd, &root) < 0) return 1;
  nodes = calloc(1, sizeof *nodes);
  nodes[0] = (struct node){.parent = 0, .name = NULL, .ino = root.st_ino, .nlookup = 1};
  n_nodes = 1;
  char opts[256];
  snprintf(opts, sizeof opts, "fd=%d,rootmode=%o,user_id=%u,group_id=%u,allow_other", fuse_fd, root.st_mode & S_IFMT, getuid(), getgid());
  /* The source names the daemon, so that a sweep can tell a mount whose daemon is gone (helpers/stuck-fs.ts). */
  char source[64];
  snprintf(source, sizeof source, "dr-stuck-fs:%d", getpid());
  if (mount(source, mountpoint, "fuse.dr-stuck-fs", MS_NOSUID | MS_NODEV, opts) < 0) {
    fprintf(stderr, "stuck-fs: mount %s: %s\n", mountpoint, strerror(errno));
    return 1;
  }

  sigset_t block, none;
  sigemptyset(&block);
  sigaddset(&block, SIGUSR1);
  sigaddset(&block, SIGUSR2);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGINT);
  sigprocmask(SIG_BLOCK, &block, &none);
  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGUSR1, &sa, NULL);
  sigaction(SIGUSR2, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);

  static char buf[BUF_SIZE];
  int initialised = 0, said_hung = 0;
  while (!term) {
    if (hung && !said_hung) say("hung");
    if (!hung && said_hung) {
      /* Answering again: what was held first, in order. */
      for (size_t i = 0; i < n_held; i++) {
        const struct fuse_in_header *h = (const void *)held[i].buf;
        int r = handle(h, held[i].buf + sizeof *h);
        if (r < 0) reply(h->unique, r, NULL, 0);
        free(held[i].buf);
      }
      n_held = 0;
      say("answering");
    }
    said_hung = hung;
    if (hung) reap();
    struct pollfd pfd = {fuse_fd, POLLIN, 0};
    /* Signals are let in only while waiting here: one that says "hang" is seen before the next request is read. */
    struct timespec tick = {0, REAP_MS * 1000000L};
    int ready = ppoll(&pfd, 1, hung && n_held > 0 ? &tick : NULL, &none);
    if (ready <= 0 || hung != said_hung) continue;
    ssize_t n = read(fuse_fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR || errno == ENOENT) continue;
      if (errno == ENODEV) break; /* unmounted */
      fprintf(stderr, "stuck-fs: read: %s\n", strerror(errno));
      break;
    }
    const struct fuse_in_header *h = (const void *)buf;
    const char *body = buf + sizeof *h;
    if (hung) {
      hold(buf, n);
      continue;
    }
    const char *name = request_name(h, body);
    int tripped = matches(trip_op, trip_name, h, name);
    int failed = matches(eio_op, eio_name, h, name);
    if (logging) fprintf(stderr, "stuck-fs: %s %s (node %llu)%s\n", op_name(h->opcode), name, (unsigned long long)h->nodeid, failed ? ": failed" : "");
    if (failed && --eio_times == 0) eio_op[0] = 0;
    int r = failed ? -eio_errno : handle(h, body);
    if (r < 0) reply(h->unique, r, NULL, 0);
    if (h->opcode == FUSE_INIT && !initialised) {
      initialised = 1;
      say("ready");
      if (probe) break;
    }
    if (tripped && --trip_times == 0) {
      trip_op[0] = 0;
      hung = 1;
    }
  }
  /* Closing the device ends the connection: every call still waiting fails (ENOTCONN), and none blocks again. */
  close(fuse_fd);
  unmount(mountpoint);
  return 0;
}
