/* The lock-step lane: RFC 1350's common case answered without entering the interpreter.
 *
 * In a boot storm nearly every packet is the same exchange: a lock-step client ACKs the
 * newest block, and the next block -- already read into the transfer's frame buffer -- goes
 * out.  The pump (tftpd/pump.py) does that in Python for about 1.1 us of user CPU per packet
 * above a bare recv/send loop.  This module does only that exchange, in C, for transfers the
 * pump hands it ("arms"), and hands everything else back untouched: every other event, every
 * other datagram, a block outside the frames it was given, a short (final) block, a send the
 * kernel refused.  The protocol's rules stay in tftpd/sender.py; what the lane did is folded
 * back into the Sender when the pump takes the transfer back ("disarm"), exactly as if
 * Sender.ack_send had been called for every ACK it answered.
 *
 * Lane(epfd).poll(timeout) waits on the pump's epoll object, answers what it can and returns
 * the other events as select.epoll.poll would.  The GIL is released for the wait and the
 * answers, as select.epoll and socket calls release it: the pump's read threads need it while
 * the pump is busy.  An event of an armed transfer that the lane read but did not answer keeps
 * its datagram (or the errno of the failed recv or send) in the transfer's slot; every poll()
 * reports that transfer again until disarm() returns what it kept, and the pump handles it as
 * if it had read it itself.  A Lane belongs to one thread (the pump's): a call made while
 * another is inside poll() without the GIL raises RuntimeError rather than change the slots
 * under it.
 *
 * Slots are indexed by descriptor number, and the lane cannot tell one socket from the next
 * one given the same number: the pump disarms a transfer before its socket is closed, and
 * disarm() releases the slot whatever else fails; the pump also disarms every descriptor as
 * it enters its epoll set, so a slot left armed by a bug can never answer for a new socket.
 *
 * An armed slot holds a buffer export of the frame buffer it was given: the pump disarms a
 * transfer before anything can recycle or drop that buffer (every chunk change happens in the
 * pump's own handling of the transfer, which starts with disarm).
 *
 * Sends in one batch.  Where the kernel offers io_uring (and ``batch`` is not turned off), the
 * answers of one poll() are not sent one send() each: each is queued as an IORING_OP_SEND and
 * the whole batch goes out in one io_uring_enter, after every ACK of the poll was read.  That
 * is one system call per batch instead of one per packet, and it keeps the pump on its CPU
 * until the batch is out: the first send() of a batch used to wake a client that then
 * preempted the pump before the others were sent.  A UDP send with MSG_DONTWAIT completes
 * inside io_uring_enter (it is never left in flight), and poll() collects every completion
 * before it returns, so no queued send outlives the poll that queued it (the frames it points
 * into stay exported by the armed slot until then).  A send the kernel refused is handled as
 * the one-send() path handles it (ENOBUFS: lost; EAGAIN: the ACK goes to the pump; anything
 * else: the errno goes to the pump).  Where io_uring_setup fails (an older kernel, the
 * io_uring_disabled sysctl, a seccomp filter returning an errno) the lane sends one send() per
 * ACK, as before; ``batched`` says which.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <linux/io_uring.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RECV_SIZE 2048
#define OP_ACK 4

typedef struct {
    int armed;
    int clean;              /* nothing of the window in flight was resent (Karn's rule) */
    long long upto;         /* newest block sent, as a sequence number (block 1 = first DATA) */
    long long first;        /* sequence number of the buffer's first frame */
    long long count;        /* frames in the buffer */
    Py_ssize_t end;         /* bytes of the buffer's frames (the last may be short) */
    Py_ssize_t seg;         /* bytes of a full DATA frame: blksize + 4 */
    double srtt;            /* smoothed RTT, seconds; < 0: no sample yet */
    double last_tx;         /* when the newest block went out (CLOCK_MONOTONIC seconds) */
    long long sent;         /* blocks this lane sent since the transfer was armed */
    /* What the lane read but did not answer, for the pump: found without the GIL as a copy
     * (``kept``, ``kept_len``) or an errno (``kept_errno``), then made ``held`` (bytes or int)
     * once the GIL is back. */
    unsigned char *kept;
    Py_ssize_t kept_len;
    int kept_errno;
    PyObject *held;
    int pending;                 /* in the lane's pending list: reported until disarmed */
    int queued;                  /* its answer is queued in the ring (inside one poll only) */
    unsigned long long reported; /* the poll() that last returned this descriptor */
    Py_buffer frames;
} Slot;

/* The io_uring the answers of one poll() are sent through (not live: one send() each). */
typedef struct {
    int live;               /* 0 (as a new object is zeroed): no ring, fd means nothing */
    int fd;
    unsigned entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map, *sqe_map;
    size_t sq_len, cq_len, sqe_len;
    unsigned long forks;    /* ``forks`` when the ring was set up: see ring_inherited() */
} Ring;

/* Forks this process has come from (counted in the child): a ring set up before the last one
 * was set up by the parent.  Its memory is MADV_DONTFORK, so a child has the lane's pointers
 * into it but not the mappings -- the addresses are free, and may hold the child's own memory
 * by the time it closes the lane. */
static unsigned long forks;

static void count_fork(void) {
    forks++;
}

static int ring_inherited(const Ring *r) {
    return r->live && r->forks != forks;
}

typedef struct {
    PyObject_HEAD
    int epfd;
    int maxevents;
    struct epoll_event *events;
    Slot *slots;            /* indexed by file descriptor */
    Py_ssize_t nslots;
    unsigned long long datagrams;
    int answered;           /* ACKs the last poll() answered with the next frame */
    /* Descriptors with something kept or held: every poll() reports them until the pump
     * disarms them, so a datagram the lane took off a socket is never lost, even when a
     * caller drops the events of one poll (the socket itself is no longer readable). */
    int *pending;
    int npending, cap_pending, narmed;
    int busy;               /* poll() is waiting or answering without the GIL */
    unsigned long long generation;
    Ring ring;
    int nqueued;            /* sends queued in the ring by this poll(), not yet submitted */
    unsigned long long batches;  /* io_uring_enter calls that sent a batch */
    int ring_errno;         /* why there is no ring (0: there is one, or none was asked for) */
    unsigned char buf[RECV_SIZE];
} Lane;

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void slot_release(Lane *self, Slot *s) {
    if (s->armed) {
        PyBuffer_Release(&s->frames);
        s->armed = 0;
        self->narmed--;
    }
    if (s->pending) {
        int fd = (int)(s - self->slots);
        for (int i = 0; i < self->npending; i++) {
            if (self->pending[i] == fd) {
                self->pending[i] = self->pending[--self->npending];
                break;
            }
        }
        s->pending = 0;
    }
    free(s->kept);
    s->kept = NULL;
    s->kept_errno = 0;
    Py_CLEAR(s->held);
}

static int refuse_busy(Lane *self) {
    if (!self->busy)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "the lane is in use by another thread's poll()");
    return -1;
}


static void ring_close(Ring *r) {
    if (!r->live)
        return;
    if (!ring_inherited(r)) {  /* an inherited ring's mappings are not ours: only the fd is */
        if (r->sqe_map != NULL && r->sqe_map != MAP_FAILED)
            munmap(r->sqe_map, r->sqe_len);
        if (r->cq_map != NULL && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
            munmap(r->cq_map, r->cq_len);
        if (r->sq_map != NULL && r->sq_map != MAP_FAILED)
            munmap(r->sq_map, r->sq_len);
    }
    if (r->fd >= 0)
        close(r->fd);
    memset(r, 0, sizeof *r);
}

/* Set up a ring of ``entries`` submissions; 0, or the errno that says why there is none. */
static int ring_open(Ring *r, unsigned entries) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    memset(r, 0, sizeof *r);
    int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0)
        return errno;
    r->live = 1;
    r->fd = fd;
    r->forks = forks;
    /* IORING_OP_SEND came in 5.6, FAST_POLL in 5.7: a kernel that has this has the opcode. */
    if (!(p.features & IORING_FEAT_FAST_POLL)) {
        ring_close(r);
        return ENOSYS;
    }
    r->entries = p.sq_entries;
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_len > r->sq_len)
            r->sq_len = r->cq_len;
        r->cq_len = r->sq_len;
    }
    r->sq_map = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                     IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP)
        r->cq_map = r->sq_map;
    else {
        r->cq_map = mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                         IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED)
            goto fail;
    }
    r->sqe_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqe_map = mmap(NULL, r->sqe_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                      IORING_OFF_SQES);
    if (r->sqe_map == MAP_FAILED)
        goto fail;
    unsigned char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->sqes = r->sqe_map;
    /* A process forked later (the opener helper) gets none of the ring's memory; a lane it
     * carries drops the ring unmapped and sends one send() each (ring_inherited). */
    madvise(r->sq_map, r->sq_len, MADV_DONTFORK);
    if (r->cq_map != r->sq_map)
        madvise(r->cq_map, r->cq_len, MADV_DONTFORK);
    madvise(r->sqe_map, r->sqe_len, MADV_DONTFORK);
    return 0;
fail: {
        int err = errno;
        ring_close(r);
        return err;
    }
}


static int Lane_init(Lane *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"epfd", "maxevents", "batch", NULL};
    int epfd, maxevents = 512, batch = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|ip", kwlist, &epfd, &maxevents, &batch))
        return -1;
    if (refuse_busy(self) < 0)
        return -1;
    if (epfd < 0 || maxevents < 1 || maxevents > 65536) {
        PyErr_SetString(PyExc_ValueError, "epfd must be a descriptor, maxevents 1..65536");
        return -1;
    }
    PyMem_Free(self->events);
    self->events = PyMem_Calloc((size_t)maxevents, sizeof(struct epoll_event));
    if (self->events == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->epfd = epfd;
    self->maxevents = maxevents;
    ring_close(&self->ring);
    /* Room for every event of one epoll_wait: at most one send per event. */
    self->ring_errno = batch ? ring_open(&self->ring, (unsigned)maxevents) : 0;
    return 0;
}

static void Lane_dealloc(Lane *self) {
    for (Py_ssize_t i = 0; i < self->nslots; i++)
        slot_release(self, &self->slots[i]);
    PyMem_Free(self->slots);
    PyMem_Free(self->pending);
    PyMem_Free(self->events);
    ring_close(&self->ring);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Slot *slot_for(Lane *self, int fd, int grow) {
    if (fd < 0)
        return NULL;
    if (fd >= self->nslots) {
        if (!grow)
            return NULL;
        Py_ssize_t n = self->nslots ? self->nslots : 64;
        while (n <= fd)
            n *= 2;
        Slot *slots = PyMem_Realloc(self->slots, (size_t)n * sizeof(Slot));
        if (slots == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        memset(slots + self->nslots, 0, (size_t)(n - self->nslots) * sizeof(Slot));
        self->slots = slots;
        self->nslots = n;
    }
    return &self->slots[fd];
}

PyDoc_STRVAR(arm_doc,
"arm(fd, upto, frames, first, count, end, seg, clean, srtt, last_tx)\n\n"
"Answer the lock-step ACKs of the transfer on ``fd`` from now on: block ``upto`` (a sequence\n"
"number) is the newest sent and the only one in flight; ``frames`` holds the DATA frames of\n"
"blocks ``first..first+count-1`` in its first ``end`` bytes, ``seg`` bytes each.  ``clean``,\n"
"``srtt`` (None: no sample yet) and ``last_tx`` are the Sender's RTT state.");

static PyObject *Lane_arm(Lane *self, PyObject *args) {
    int fd, clean;
    long long upto, first, count;
    Py_ssize_t end, seg;
    PyObject *frames, *srtt_obj;
    double last_tx;
    if (!PyArg_ParseTuple(args, "iLOLLnnpOd", &fd, &upto, &frames, &first, &count, &end, &seg,
                          &clean, &srtt_obj, &last_tx))
        return NULL;
    double srtt = -1.0;
    if (srtt_obj != Py_None) {
        srtt = PyFloat_AsDouble(srtt_obj);
        if (srtt == -1.0 && PyErr_Occurred())
            return NULL;
    }
    if (refuse_busy(self) < 0)
        return NULL;
    if (upto < 0 || first < 0 || count < 0 || seg < 5 || end < 0 || upto >= LLONG_MAX / 2
            || count > PY_SSIZE_T_MAX / seg) {
        PyErr_SetString(PyExc_ValueError, "arm: negative or impossible block numbers or sizes");
        return NULL;
    }
    Slot *s = slot_for(self, fd, 1);
    if (s == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "arm: bad file descriptor");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(frames, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (end > view.len || (count > 0 && end <= (count - 1) * seg) || end > count * seg) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "arm: frames do not match first/count/end/seg");
        return NULL;
    }
    /* Room to keep one datagram per armed slot, made before the slot's old state (a stale
     * arm on this number) is dropped, so that a failure here leaves everything as it was. */
    if (self->narmed + 1 > self->cap_pending) {
        int cap = self->cap_pending ? 2 * self->cap_pending : 64;
        int *pending = PyMem_Realloc(self->pending, (size_t)cap * sizeof(int));
        if (pending == NULL) {
            PyBuffer_Release(&view);
            PyErr_NoMemory();
            return NULL;
        }
        self->pending = pending;
        self->cap_pending = cap;
    }
    slot_release(self, s);
    self->narmed++;
    s->frames = view;
    s->armed = 1;
    s->clean = clean;
    s->upto = upto;
    s->first = first;
    s->count = count;
    s->end = end;
    s->seg = seg;
    s->srtt = srtt;
    s->last_tx = last_tx;
    s->sent = 0;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(disarm_doc,
"disarm(fd) -> (upto, last_tx, srtt, sent, held) or None\n\n"
"Take the transfer on ``fd`` back (None: it was not armed).  ``upto``: the newest block sent\n"
"now, ``sent`` of them by the lane, the last at ``last_tx``; ``srtt``: None or seconds;\n"
"``held``: the datagram the lane read but did not answer (bytes), the errno of a recv or\n"
"send that failed (int), or None.");

static PyObject *Lane_disarm(Lane *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    if (refuse_busy(self) < 0)
        return NULL;
    Slot *s = slot_for(self, fd, 0);
    if (s == NULL || !s->armed)
        Py_RETURN_NONE;
    /* The slot is released before anything here can fail: once disarm() is called, nothing
     * is left armed on this number, whatever it returns. */
    PyObject *held = s->held;
    s->held = NULL;
    int failed = 0;
    if (held == NULL && s->kept != NULL)  /* kept by a poll() that failed before report() */
        failed = (held = PyBytes_FromStringAndSize((const char *)s->kept, s->kept_len)) == NULL;
    else if (held == NULL && s->kept_errno)
        failed = (held = PyLong_FromLong(s->kept_errno)) == NULL;
    long long upto = s->upto, sent = s->sent;
    double last_tx = s->last_tx, srtt_value = s->srtt;
    slot_release(self, s);
    if (failed)
        return NULL;
    if (held == NULL)
        held = Py_NewRef(Py_None);
    PyObject *srtt = srtt_value < 0 ? Py_NewRef(Py_None) : PyFloat_FromDouble(srtt_value);
    if (srtt == NULL) {
        Py_DECREF(held);
        return NULL;
    }
    return Py_BuildValue("(LdNLN)", upto, last_tx, srtt, sent, held);
}

/* Keep what the lane read but will not answer (without the GIL: plain malloc).  The list has
 * room: arm() grows it to the number of armed slots, and only an armed slot keeps. */
static void keep(Lane *self, int fd, Slot *s, const unsigned char *data, ssize_t n, int err) {
    if (!s->pending) {
        s->pending = 1;
        self->pending[self->npending++] = fd;
    }
    if (err) {
        s->kept_errno = err;
        return;
    }
    s->kept = malloc(n > 0 ? (size_t)n : 1);
    if (s->kept == NULL) {
        s->kept_errno = ENOMEM;  /* reported as the transfer's end, never dropped silently */
        return;
    }
    memcpy(s->kept, data, (size_t)n);
    s->kept_len = n;
}

#define KEPT 0      /* a datagram or an errno kept in the slot, for the pump */
#define SENT 1      /* the ACK answered with the next frame */
#define NOTHING 2   /* nothing queued after all (a datagram dropped for its checksum) */
#define QUEUED 3    /* the next frame is queued in the ring: flush() says SENT or KEPT */

/* What a frame that went out does to the slot (the send() path and flush() alike). */
static void sent_one(Lane *self, Slot *s, double now) {
    if (s->clean) {
        double sample = now - s->last_tx;
        s->srtt = s->srtt < 0 ? sample : 0.875 * s->srtt + 0.125 * sample;
    }
    s->clean = 1;
    s->upto += 1;
    s->last_tx = now;
    s->sent += 1;
    self->datagrams += 1;
}

/* Queue the frame at ``o`` of slot ``s`` as an IORING_OP_SEND on ``fd`` (room was checked). */
static void queue_send(Lane *self, int fd, Slot *s, Py_ssize_t o) {
    Ring *r = &self->ring;
    unsigned tail = *r->sq_tail;
    unsigned idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_SEND;
    sqe->fd = fd;
    sqe->addr = (unsigned long long)(uintptr_t)((const char *)s->frames.buf + o);
    sqe->len = (unsigned)s->seg;
    sqe->msg_flags = MSG_DONTWAIT;
    sqe->user_data = (unsigned long long)fd;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    s->queued = 1;
    self->nqueued++;
}

/* One readable event of an armed transfer, without the GIL: SENT or NOTHING leave nothing for
 * the pump to do; KEPT left it a datagram or an errno in the slot. */
static int answer(Lane *self, int fd, Slot *s) {
    ssize_t n = recv(fd, self->buf, RECV_SIZE, MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return NOTHING;  /* epoll reports it again if a datagram comes */
        keep(self, fd, s, NULL, 0, errno);
        return KEPT;
    }
    const unsigned char *b = self->buf;
    if (n >= 4 && b[0] == 0 && b[1] == OP_ACK
            && (((unsigned)b[2] << 8) | b[3]) == (unsigned)(s->upto & 0xFFFF)) {
        long long i = s->upto + 1 - s->first;
        if (i >= 0 && i < s->count) {
            Py_ssize_t o = (Py_ssize_t)i * s->seg;
            if (o + s->seg <= s->end) {  /* a full frame: not the file's short last one */
                /* Batched where there is a ring; a longer datagram (an ACK with bytes after
                 * the block number) is answered at once, so that what flush() hands the pump
                 * on a refused send -- the four bytes of the ACK -- is what was read. */
                if (self->ring.live && n == 4
                        && self->nqueued < (int)self->ring.entries) {
                    queue_send(self, fd, s, o);
                    return QUEUED;
                }
                ssize_t r = send(fd, (const char *)s->frames.buf + o, (size_t)s->seg,
                                 MSG_DONTWAIT);
                if (r >= 0 || errno == ENOBUFS) {
                    /* ENOBUFS: dropped on the way out, like a lost packet; the timer
                     * recovers it (the pump's rule too). */
                    sent_one(self, s, monotonic());
                    return SENT;
                }
                if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                    keep(self, fd, s, NULL, 0, errno);  /* the client is gone */
                    return KEPT;
                }
                /* The socket is full (or the send was interrupted): the pump answers the ACK
                 * again, and waits to write if it must. */
            }
        }
    }
    keep(self, fd, s, b, n, 0);
    return KEPT;
}

/* Hand the pump the ACK of block ``upto`` as the client sent it: the four bytes answer()
 * queued a send for (it queues none for a longer datagram). */
static void keep_ack(Lane *self, int fd, Slot *s) {
    unsigned char ack[4] = {0, OP_ACK, (unsigned char)((s->upto >> 8) & 0xFF),
                            (unsigned char)(s->upto & 0xFF)};
    keep(self, fd, s, ack, 4, 0);
}

/* What became of one queued send: SENT as in answer(), or the ACK (or errno) for the pump. */
static int settle(Lane *self, int fd, int res, double now) {
    Slot *s = fd >= 0 && fd < self->nslots ? &self->slots[fd] : NULL;
    if (s == NULL || !s->queued)
        return NOTHING;  /* not one of this poll's (cannot happen: poll() drains the ring) */
    s->queued = 0;
    if (res >= 0 || res == -ENOBUFS) {  /* ENOBUFS: lost on the way out, as in answer() */
        sent_one(self, s, now);
        return SENT;
    }
    if (res == -EAGAIN || res == -EWOULDBLOCK || res == -EINTR)
        keep_ack(self, fd, s);  /* the socket is full: the pump answers it, and waits to write */
    else
        keep(self, fd, s, NULL, 0, -res);  /* the client is gone */
    return KEPT;
}

/* Send every frame this poll() queued in one io_uring_enter, and settle each: returns how many
 * went out.  Every queued send is settled before this returns -- none is left in the ring to
 * read a frame buffer the pump may release once poll() is over. */
static int flush(Lane *self) {
    Ring *r = &self->ring;
    int want = self->nqueued, submitted, sent = 0;
    self->nqueued = 0;
    int refused = 0;
    do
        submitted = (int)syscall(__NR_io_uring_enter, r->fd, (unsigned)want, 0u, 0u, NULL, 0);
    while (submitted < 0 && errno == EINTR);
    if (submitted < 0 && errno != EAGAIN && errno != EBUSY && errno != ENOMEM)
        refused = errno;  /* not a passing shortage (EBADF, EFAULT, ...): the ring is unusable */
    double now = monotonic();
    if (submitted > 0)
        self->batches += 1;
    /* What the kernel did not take (a failed or short submit: EAGAIN, EBUSY, ENOMEM) is taken
     * off the ring again and handed to the pump, which answers it the usual way. */
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE), tail = *r->sq_tail;
    for (unsigned i = head; i != tail; i++) {
        struct io_uring_sqe *sqe = &r->sqes[r->sq_array[i & *r->sq_mask]];
        int fd = (int)sqe->user_data;
        Slot *s = fd >= 0 && fd < self->nslots ? &self->slots[fd] : NULL;
        if (s != NULL && s->queued) {
            s->queued = 0;
            keep_ack(self, fd, s);
        }
    }
    __atomic_store_n(r->sq_tail, head, __ATOMIC_RELEASE);
    int done = 0, stuck = 0;
    if (submitted < 0)
        submitted = 0;
    while (done < submitted) {
        unsigned ch = *r->cq_head, ct = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        if (ch == ct) {
            /* Not seen here: a UDP send with MSG_DONTWAIT completes inside the submit.  Were
             * one ever left waiting for room in the socket, this waits for it (loopback and
             * a NIC free that room within microseconds) rather than return while the kernel
             * may still read a frame buffer the pump could release. */
            int w = (int)syscall(__NR_io_uring_enter, r->fd, 0u, (unsigned)(submitted - done),
                                 IORING_ENTER_GETEVENTS, NULL, 0);
            if (w < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY && ++stuck > 3) {
                refused = errno;
                break;
            }
            continue;
        }
        for (; ch != ct; ch++) {
            struct io_uring_cqe *c = &r->cqes[ch & *r->cq_mask];
            if (settle(self, (int)c->user_data, c->res, now) == SENT)
                sent++;
            done++;
        }
        __atomic_store_n(r->cq_head, ch, __ATOMIC_RELEASE);
    }
    if (done < submitted) {
        /* The ring no longer answers: end the transfers whose sends it holds (their frames
         * stay exported until the pump disarms them). */
        for (Py_ssize_t fd = 0; fd < self->nslots; fd++) {
            Slot *s = &self->slots[fd];
            if (s->queued) {
                s->queued = 0;
                keep(self, (int)fd, s, NULL, 0, EIO);
            }
        }
    }
    if (refused) {
        /* One send() per ACK from now on; the pump sees ``batched`` turn false and says so. */
        self->ring_errno = refused;
        if (refused == EBADF)
            r->fd = -1;  /* the number is not the ring's any more: closing it could close
                          * whatever the process opened there since */
        ring_close(r);
    }
    return sent;
}

/* Append (fd, ev) to ``out``, making what the slot kept a Python object first. */
static int report(PyObject *out, Slot *s, int fd, uint32_t ev) {
    if (s != NULL && s->held == NULL && (s->kept != NULL || s->kept_errno)) {
        PyObject *held = s->kept != NULL
            ? PyBytes_FromStringAndSize((const char *)s->kept, s->kept_len)
            : PyLong_FromLong(s->kept_errno);
        if (held == NULL)
            return -1;  /* still kept: the next poll() or disarm() tries again */
        s->held = held;
        free(s->kept);
        s->kept = NULL;
        s->kept_errno = 0;
    }
    PyObject *item = Py_BuildValue("(iI)", fd, (unsigned int)ev);
    if (item == NULL || PyList_Append(out, item) < 0) {
        Py_XDECREF(item);
        return -1;
    }
    Py_DECREF(item);
    return 0;
}

PyDoc_STRVAR(poll_doc,
"poll(timeout=0.0) -> [(fd, events), ...]\n\n"
"One epoll_wait on the pump's epoll object (``timeout`` seconds, rounded up to milliseconds;\n"
"negative: forever).  Readable armed transfers whose datagram is the expected ACK are\n"
"answered here; every other event is returned as select.epoll.poll returns it, and\n"
"``answered`` counts the answered ones.  The GIL is released for the wait and the answers,\n"
"as select.epoll.poll and socket calls release it: the pump's read threads must get it\n"
"while the pump is busy, or a transfer waits for its next chunk for the interpreter's whole\n"
"switch interval (5 ms).");

static PyObject *Lane_poll(Lane *self, PyObject *args) {
    double timeout = 0.0;
    if (!PyArg_ParseTuple(args, "|d", &timeout))
        return NULL;
    if (isnan(timeout)) {
        PyErr_SetString(PyExc_ValueError, "poll: timeout is NaN");
        return NULL;
    }
    if (refuse_busy(self) < 0)
        return NULL;
    if (ring_inherited(&self->ring))  /* a forked child: one send() per ACK, as without a ring */
        ring_close(&self->ring);
    int ms;
    if (timeout < 0)
        ms = -1;
    else if (timeout * 1000.0 > INT_MAX)
        ms = INT_MAX;
    else
        ms = (int)ceil(timeout * 1000.0);
    int n, err, answered = 0;
    double deadline = ms > 0 ? monotonic() + timeout : 0.0;
again:
    err = 0;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    n = epoll_wait(self->epfd, self->events, self->maxevents, ms);
    if (n < 0)
        err = errno;
    for (int k = 0; k < n; k++) {
        int fd = self->events[k].data.fd;
        Slot *s = fd >= 0 && fd < self->nslots ? &self->slots[fd] : NULL;
        if (s != NULL && s->armed && s->held == NULL && s->kept == NULL && !s->kept_errno
                && self->events[k].events == EPOLLIN) {
            int r = answer(self, fd, s);
            if (r != KEPT)
                self->events[k].events = 0;  /* not for the pump (epoll never gives 0) */
            if (r == SENT)
                answered++;
        }
    }
    if (self->nqueued)  /* what flush() hands the pump is reported from the pending list */
        answered += flush(self);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    self->answered = answered;
    if (n < 0 && err == EINTR) {
        /* As select.epoll.poll does (PEP 475): run the signal handlers, then wait out the
         * rest of the timeout.  Not only signals interrupt the wait: io_uring's notifications
         * (a ring being torn down) do too. */
        if (PyErr_CheckSignals() < 0)
            return NULL;
        if (ms > 0) {  /* clamped as above: a wait of over INT_MAX ms is longer than int */
            double left = (deadline - monotonic()) * 1000.0;
            ms = left <= 0 ? 0 : left > INT_MAX ? INT_MAX : (int)ceil(left);
        }
        if (ms != 0)
            goto again;
        n = 0;  /* the time is up: still report what is pending */
    }
    if (n < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    unsigned long long gen = ++self->generation;
    for (int k = 0; k < n; k++) {
        uint32_t ev = self->events[k].events;
        if (ev == 0)
            continue;
        int fd = self->events[k].data.fd;
        Slot *s = fd >= 0 && fd < self->nslots ? &self->slots[fd] : NULL;
        if (s != NULL)
            s->reported = gen;
        if (report(out, s, fd, ev) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    for (int i = 0; i < self->npending; i++) {  /* kept earlier, not taken back yet */
        int fd = self->pending[i];
        Slot *s = &self->slots[fd];
        if (s->reported != gen) {
            s->reported = gen;
            if (report(out, s, fd, EPOLLIN) < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
    }
    return out;
}

static PyObject *Lane_get_datagrams(Lane *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->datagrams);
}

static PyObject *Lane_get_answered(Lane *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->answered);
}

static PyObject *Lane_get_batched(Lane *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->ring.live && !ring_inherited(&self->ring));
}

static PyObject *Lane_get_batches(Lane *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->batches);
}

static PyObject *Lane_get_batch_error(Lane *self, void *closure) {
    (void)closure;
    if (!self->ring_errno)
        Py_RETURN_NONE;
    return PyLong_FromLong(self->ring_errno);
}

static PyObject *Lane_get_pending(Lane *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->npending);
}

static PyObject *Lane_armed(Lane *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    Slot *s = slot_for(self, fd, 0);
    return PyBool_FromLong(s != NULL && s->armed);
}

PyDoc_STRVAR(close_doc,
"close()\n\n"
"Disarm every slot and close the ring (its descriptor and memory), now rather than when the\n"
"object is collected.  The lane is not used after this.");

static PyObject *Lane_close(Lane *self, PyObject *Py_UNUSED(ignored)) {
    if (refuse_busy(self) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < self->nslots; i++)
        slot_release(self, &self->slots[i]);
    ring_close(&self->ring);
    Py_RETURN_NONE;
}

static PyMethodDef Lane_methods[] = {
    {"close", (PyCFunction)Lane_close, METH_NOARGS, close_doc},
    {"arm", (PyCFunction)Lane_arm, METH_VARARGS, arm_doc},
    {"disarm", (PyCFunction)Lane_disarm, METH_VARARGS, disarm_doc},
    {"poll", (PyCFunction)Lane_poll, METH_VARARGS, poll_doc},
    {"armed", (PyCFunction)Lane_armed, METH_VARARGS, "armed(fd) -> whether fd is armed"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Lane_getset[] = {
    {"datagrams", (getter)Lane_get_datagrams, NULL, "DATA datagrams the lane sent", NULL},
    {"answered", (getter)Lane_get_answered, NULL, "ACKs the last poll() answered", NULL},
    {"batched", (getter)Lane_get_batched, NULL,
     "whether answers go out through io_uring, one io_uring_enter per poll()", NULL},
    {"batches", (getter)Lane_get_batches, NULL,
     "io_uring_enter calls that sent the answers of one poll()", NULL},
    {"batch_error", (getter)Lane_get_batch_error, NULL,
     "the errno that left the lane without its ring (None: it has one, or none was asked for)",
     NULL},
    {"pending", (getter)Lane_get_pending, NULL,
     "descriptors holding a datagram or errno the pump has not taken back", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tftpd._lane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The lock-step lane of one pump's epoll object (see the module's docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods,
    .tp_getset = Lane_getset,
};

static struct PyModuleDef lane_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tftpd._lane",
    .m_doc = "RFC 1350 lock-step ACKs answered outside the interpreter (see tftpd/pump.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__lane(void) {
    if (PyType_Ready(&LaneType) < 0)
        return NULL;
    /* Once per process however often the module is initialised: a child must know that the
     * rings it carries are its parent's (ring_inherited). */
    static int counting;
    if (!counting) {
        int err = pthread_atfork(NULL, NULL, count_fork);
        if (err) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        counting = 1;
    }
    PyObject *m = PyModule_Create(&lane_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
