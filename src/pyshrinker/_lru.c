/*
 * pyshrinker._lru: the C core of ShrinkableLRU and @shrinkable_cache.
 *
 * Why C. Measured on CPython 3.11 (benchmarks/lru.py): a pure-Python LRU that takes a lock and
 * keeps sizes on every set cannot come near cachetools.LRUCache's speed times 0.55, because even a
 * plain OrderedDict LRU with no lock and no sizes is at 0.55-0.65 of it: the Python frame of
 * get() alone costs more than the whole budget. So the hot paths (get, [], []=, del, in, len, and
 * a cached function's call) are C, in the manner of functools.lru_cache's own C implementation
 * (CPython's Modules/_functoolsmodule.c), and everything that is rare (reporting chunks to the
 * controller, notifying evictions, reclaim bookkeeping) stays in Python (pyshrinker.lru), called
 * from here through two hook methods.
 *
 * Structure. Each entry is a Node (a plain C struct, not a Python object) holding the key, the
 * value, the key's hash and the entry's size. Nodes form a circular doubly-linked list through a
 * sentinel (root), least recently used first, and an index finds them by key: an open-addressing
 * table of (hash, node) slots probed as CPython's dict probes. The object keeps the sum of the
 * sizes (total) and the number of nodes (linked). A node is in the index exactly when it is in
 * the list: both change together, with no Python code in between.
 *
 * Why an index of our own and not a dict (functools uses a dict). Removing an entry from a dict
 * means looking its key up again: the public API (3.13 removed the known-hash calls) hashes the key
 * again, and every lookup may call the __eq__ of keys whose hash collides. So an eviction, which
 * must happen when a shrink request arrives, would run user code that can raise, re-enter the
 * cache or see a hash that changed; and the dict cannot say which node a deletion removed, so a
 * node could stay in the list after its key left the dict (len and iteration disagreeing). Our
 * index remembers each node's slot and its hash: removing a node runs no Python code and cannot
 * fail, and a key's __hash__ is called once per operation at most.
 *
 * Where Python code runs, and the rules that make it safe. Python code (and so another thread,
 * which can take the GIL there) runs only at these points: a key's __hash__ and __eq__, the
 * user's getsizeof, the cached function, the hooks (_sync, _evicted), the release of references
 * (a key's or value's __del__), and, on 3.10 and 3.11, any allocation of a GC-tracked object
 * (a tuple, a list), which may run a collection and so finalizers. The rules:
 *   - an operation does all that may run Python code or fail first (size, hash, lookup), and
 *     changes nothing until then; from its first change to its last it runs no Python code,
 *     allocates no GC-tracked object and cannot fail. So a failed operation leaves the cache
 *     exactly as it was, and every reentrant call sees a consistent cache;
 *   - a lookup that called __eq__ checks that the index did not change meanwhile (version), and
 *     starts again if it did, as dict lookups do;
 *   - nodes an operation takes out go on a private chain (Taken) and are released at its very
 *     end, after the hooks, with any pending exception saved around the release;
 *   - evictions for maxsize happen before the new entry is stored, so the cache never holds more
 *     than maxsize, not even for a moment;
 *   - every sum of sizes is checked: what cannot be summed is refused before anything changes.
 *
 * Deallocation saves and restores a pending exception (values' finalizers run inside it) and
 * never clears one it did not raise.
 *
 * On a free-threaded build this module does not declare itself GIL-free, so importing it turns the
 * GIL back on.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

static PyObject *sys_getsizeof;   /* sys.getsizeof */
static PyObject *closed_error;    /* pyshrinker.errors.ClosedError */
static PyObject *kwd_mark;        /* separates positional and keyword arguments in call keys */
static PyObject *str_missing;     /* "__missing__" */
static PyObject *str_sync;        /* "_sync" */
static PyObject *str_evicted;     /* "_evicted" */
static PyObject *str_getsizeof;   /* "getsizeof" */

/* ---------------------------------------------------------------------- pending exceptions */

/* Saving and restoring the exception being raised, around code that must run without one. */
#if PY_VERSION_HEX >= 0x030C0000
typedef struct {
    PyObject *exc;
} SavedError;

static inline void
save_error(SavedError *saved)
{
    saved->exc = PyErr_GetRaisedException();
}

static inline void
restore_error(SavedError *saved)
{
    if (saved->exc != NULL) {
        PyErr_SetRaisedException(saved->exc);
    }
}
#else
typedef struct {
    PyObject *type, *value, *traceback;
} SavedError;

static inline void
save_error(SavedError *saved)
{
    PyErr_Fetch(&saved->type, &saved->value, &saved->traceback);
}

static inline void
restore_error(SavedError *saved)
{
    if (saved->type != NULL) {
        PyErr_Restore(saved->type, saved->value, saved->traceback);
    }
}
#endif

/* ------------------------------------------------------------------------------------ nodes */

/* How an entry's size (what maxsize caps) is found: 1 for each entry, as cachetools' default;
   getsizeof(value), a callable given to the constructor; self.getsizeof(value), a subclass's
   override. */
enum { SIZE_ONE, SIZE_CALL, SIZE_METHOD };
/* How an entry's bytes (what the controller is told) are found: sys.getsizeof(value), with a
   fast path for exact bytes; memsize(value); or the size itself (memsize is getsizeof). */
enum { MEM_ESTIMATE, MEM_CALL, MEM_SIZE };

typedef struct Node {
    struct Node *prev; /* NULL once taken out of the list */
    struct Node *next; /* once taken out: the next node of the Taken chain */
    PyObject *key;
    PyObject *value;
    Py_hash_t hash;
    Py_ssize_t size;  /* getsizeof(value): what maxsize caps (1 by default) */
    Py_ssize_t bytes; /* the memory the entry is reckoned to take: what is reported */
    size_t slot; /* where the index holds it */
} Node;

/* Free a node taken out of the structure (may run arbitrary code: call it last). */
static void
node_free(Node *n)
{
    PyObject *key = n->key, *value = n->value;
    PyMem_Free(n);
    Py_DECREF(key);
    Py_DECREF(value);
}

/* ------------------------------------------------------------------------------------ object */

typedef struct {
    Py_hash_t hash;
    Node *node; /* NULL: never used; TOMBSTONE: its node was removed */
} Slot;

static Node tombstone;
#define TOMBSTONE (&tombstone)
#define INDEX_MIN 8

typedef struct {
    PyObject_HEAD
    Node root;               /* sentinel: root.next is the LRU node, root.prev the MRU node */
    Slot *slots;             /* the index: mask + 1 slots, at most 2/3 of them filled */
    size_t mask;
    Py_ssize_t filled;       /* slots holding a node or a tombstone */
    size_t version;          /* changes whenever the index does */
    Py_ssize_t total;        /* sum of the sizes of the nodes (currsize) */
    Py_ssize_t mem_total;    /* sum of the bytes of the nodes (what the chunks count) */
    Py_ssize_t linked;       /* nodes */
    Py_ssize_t max_total;    /* cap on total, -1 for none */
    Py_ssize_t max_entries;  /* cap on nodes, -1 for none */
    PyObject *getsizeof;     /* SIZE_CALL: called with the value */
    PyObject *memsize;       /* MEM_CALL: called with the value */
    int size_mode;           /* SIZE_ONE, SIZE_CALL or SIZE_METHOD */
    int mem_mode;            /* MEM_ESTIMATE, MEM_CALL or MEM_SIZE */
    Py_ssize_t sync_lo;      /* call self._sync() when mem_total < sync_lo or > sync_hi */
    Py_ssize_t sync_hi;
    Py_ssize_t hits;
    Py_ssize_t misses;
    Py_ssize_t evictions;    /* entries evicted to respect a cap */
    int closed;              /* inserts raise ClosedError (mapping) or are skipped (function) */
    int notify;              /* call self._evicted(pairs) after evictions for a cap */
} Core;

typedef struct {
    Core core;
    PyObject *func;
    int typed;
} CachedFunc;

static PyTypeObject BaseType;
static PyTypeObject CoreType;
static PyTypeObject FuncType;

/* ----------------------------------------------------------------------- the order list */

static inline void
link_mru(Core *c, Node *n)
{
    Node *last = c->root.prev;
    n->prev = last;
    n->next = &c->root;
    last->next = n;
    c->root.prev = n;
}

static inline void
unlink_node(Node *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->prev = NULL;
    n->next = NULL;
}

static inline void
move_mru(Core *c, Node *n)
{
    if (c->root.prev != n) {
        unlink_node(n);
        link_mru(c, n);
    }
}

/* ----------------------------------------------------------------------------- the index */

/* The probe sequence of CPython's dict: every slot is reached, for any hash. */
#define PROBE_START(c, hash, i, perturb) \
    do { (perturb) = (size_t)(hash); (i) = (size_t)(hash) & (c)->mask; } while (0)
#define PROBE_NEXT(c, i, perturb) \
    do { (perturb) >>= 5; (i) = ((i) * 5 + (perturb) + 1) & (c)->mask; } while (0)

/* Put n in a free slot of its probe sequence. Runs no Python code; room must be reserved. */
static void
index_put(Core *c, Node *n)
{
    size_t i, perturb;
    PROBE_START(c, n->hash, i, perturb);
    while (c->slots[i].node != NULL && c->slots[i].node != TOMBSTONE) {
        PROBE_NEXT(c, i, perturb);
    }
    if (c->slots[i].node == NULL) {
        c->filled++;
    }
    c->slots[i].hash = n->hash;
    c->slots[i].node = n;
    n->slot = i;
    c->version++;
}

static inline void
index_remove(Core *c, Node *n)
{
    c->slots[n->slot].node = TOMBSTONE;
    c->version++;
}

/*
 * Rebuild the index with room for `entries` nodes (a third of its slots). Returns 0, or -1
 * when memory is short (no exception set; the index is unchanged). Runs no Python code.
 */
static int
index_rebuild(Core *c, Py_ssize_t entries)
{
    size_t size = INDEX_MIN;
    while (size / 3 < (size_t)entries) {
        if (size > PY_SSIZE_T_MAX / (2 * sizeof(Slot))) {
            return -1;
        }
        size <<= 1;
    }
    Slot *slots = PyMem_Calloc(size, sizeof(Slot));
    if (slots == NULL) {
        return -1;
    }
    PyMem_Free(c->slots);
    c->slots = slots;
    c->mask = size - 1;
    c->filled = 0;
    for (Node *n = c->root.next; n != &c->root; n = n->next) {
        index_put(c, n);
    }
    c->version++;
    return 0;
}

/* Make room for one more node (-1 with MemoryError set). Runs no Python code. */
static inline int
index_reserve(Core *c)
{
    if ((size_t)(c->filled + 1) * 3 <= (c->mask + 1) * 2) {
        return 0;
    }
    if (index_rebuild(c, c->linked + 1) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Give back most of an index that has become mostly empty; quietly keeps it if memory is short. */
static inline void
index_maybe_shrink(Core *c)
{
    if (c->mask + 1 > INDEX_MIN && (size_t)c->linked * 8 < c->mask + 1) {
        (void)index_rebuild(c, c->linked);
    }
}

/*
 * The node whose key equals key, or NULL: *found. Returns 0, or -1 with an error set (a key's
 * __eq__ raised). The stored key is compared first, as dict does: stored == key. An __eq__ may
 * run any code, this cache included: if the index changed meanwhile, the lookup starts again.
 */
static int
index_find(Core *c, PyObject *key, Py_hash_t hash, Node **found)
{
    size_t i, perturb;
restart:
    PROBE_START(c, hash, i, perturb);
    for (;;) {
        Slot *slot = &c->slots[i];
        Node *n = slot->node;
        if (n == NULL) {
            *found = NULL;
            return 0;
        }
        if (n != TOMBSTONE && slot->hash == hash) {
            if (n->key == key) {
                *found = n;
                return 0;
            }
            size_t version = c->version;
            PyObject *stored = Py_NewRef(n->key);
            int eq = PyObject_RichCompareBool(stored, key, Py_EQ);
            Py_DECREF(stored);
            if (eq < 0) {
                return -1;
            }
            if (c->version != version) {
                goto restart;
            }
            if (eq) {
                *found = n;
                return 0;
            }
        }
        PROBE_NEXT(c, i, perturb);
    }
}

/* ------------------------------------------------------------------- taking nodes out */

/* Nodes taken out during one operation, released at its end. */
typedef struct {
    Node *head; /* the last taken; chained through next */
    Py_ssize_t count;
} Taken;

#define TAKEN_INIT {NULL, 0}

/* Take node n out of the index and the list. Runs no Python code and cannot fail. */
static void
take_out(Core *c, Node *n, Taken *taken)
{
    index_remove(c, n);
    unlink_node(n);
    c->total -= n->size;
    c->mem_total -= n->bytes;
    c->linked--;
    n->next = taken->head;
    taken->head = n;
    taken->count++;
}

/*
 * Release the taken nodes, and old (a replaced value, or NULL). This runs finalizers: any code
 * at all. A pending exception is kept aside meanwhile, so that the code runs as Python code must,
 * with none set, and the exception is the one still pending afterwards.
 */
static void
release(Taken *taken, PyObject *old)
{
    Node *n = taken->head;
    taken->head = NULL;
    taken->count = 0;
    if (n == NULL && old == NULL) {
        return;
    }
    SavedError saved;
    save_error(&saved);
    while (n != NULL) {
        Node *next = n->next;
        node_free(n);
        n = next;
    }
    Py_XDECREF(old);
    restore_error(&saved);
}

/* A list of (key, value) tuples for the taken nodes, first taken first; NULL with an error. */
static PyObject *
taken_pairs(Taken *taken)
{
    PyObject *pairs = PyList_New(taken->count);
    if (pairs == NULL) {
        return NULL;
    }
    Py_ssize_t i = taken->count;
    for (Node *n = taken->head; n != NULL; n = n->next) {
        PyObject *pair = PyTuple_Pack(2, n->key, n->value);
        if (pair == NULL) {
            Py_DECREF(pairs);
            return NULL;
        }
        PyList_SET_ITEM(pairs, --i, pair);
    }
    return pairs;
}

/* Take out every node: the index and the list are empty after it. No Python code, no failure. */
static void
take_all(Core *c, Taken *taken)
{
    Node *n = c->root.next;
    while (n != &c->root) {
        Node *next = n->next;
        n->prev = NULL;
        n->next = taken->head;
        taken->head = n;
        taken->count++;
        n = next;
    }
    c->root.next = &c->root;
    c->root.prev = &c->root;
    c->total = 0;
    c->mem_total = 0;
    c->linked = 0;
    if (c->slots != NULL) {
        memset(c->slots, 0, (c->mask + 1) * sizeof(Slot));
    }
    c->filled = 0;
    c->version++;
}

/*
 * End of an operation that changed the cache: give back index memory, call the hooks (sync if
 * total left its window, then evicted if there are evictions to tell), then release what the
 * operation took out. The change stands whatever happens here; returns 0, or -1 if a hook failed
 * (its exception is the operation's).
 */
static int
finish(Core *c, PyObject *old, Taken *taken, int tell_evicted)
{
    int rc = 0;
    PyObject *pairs = NULL;
    index_maybe_shrink(c);
    if (tell_evicted && c->notify && taken->count > 0) {
        pairs = taken_pairs(taken);
        if (pairs == NULL) {
            rc = -1;
        }
    }
    if (rc == 0 && (c->mem_total < c->sync_lo || c->mem_total > c->sync_hi)) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)c, str_sync);
        if (r == NULL) {
            rc = -1;
        }
        Py_XDECREF(r);
    }
    if (rc == 0 && pairs != NULL) {
        PyObject *r = PyObject_CallMethodOneArg((PyObject *)c, str_evicted, pairs);
        if (r == NULL) {
            rc = -1;
        }
        Py_XDECREF(r);
    }
    Py_XDECREF(pairs);
    release(taken, old);
    return rc;
}

/* ------------------------------------------------------------------------------ storing */

/* The type's name without its module, as type(self).__name__ gives it. */
static const char *
short_name(PyObject *self)
{
    const char *name = Py_TYPE(self)->tp_name;
    const char *dot = strrchr(name, '.');
    return dot != NULL ? dot + 1 : name;
}

/* A size a sizer returned, as a non-negative Py_ssize_t; -1 with an error set. Steals result. */
static Py_ssize_t
checked_size(PyObject *result, const char *what)
{
    if (result == NULL) {
        return -1;
    }
    Py_ssize_t size = PyNumber_AsSsize_t(result, PyExc_OverflowError);
    if (size == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_OverflowError,
                         "%s returned %R: a size must be an int from 0 to sys.maxsize", what,
                         result);
        }
        Py_DECREF(result);
        return -1;
    }
    Py_DECREF(result);
    if (size < 0) {
        PyErr_Format(PyExc_ValueError, "value size must be non-negative, got %zd", size);
        return -1;
    }
    return size;
}

/*
 * The size of value (what maxsize caps) in *size and its bytes (what is reported) in *bytes.
 * Returns 0, or -1 with an error set. May run Python code (the sizers): call it before any change.
 */
static int
entry_sizes(Core *c, PyObject *value, Py_ssize_t *size, Py_ssize_t *bytes)
{
    switch (c->size_mode) {
    case SIZE_CALL:
        *size = checked_size(PyObject_CallOneArg(c->getsizeof, value), "getsizeof");
        break;
    case SIZE_METHOD:
        *size = checked_size(PyObject_CallMethodOneArg((PyObject *)c, str_getsizeof, value),
                             "getsizeof");
        break;
    default:
        *size = 1;
    }
    if (*size < 0) {
        return -1;
    }
    switch (c->mem_mode) {
    case MEM_CALL:
        *bytes = checked_size(PyObject_CallOneArg(c->memsize, value), "memsize");
        break;
    case MEM_SIZE:
        *bytes = *size;
        break;
    default:
        if (PyBytes_CheckExact(value)) {
            /* What bytes.__sizeof__ (and so sys.getsizeof) returns: bytes are not GC-tracked. */
            *bytes = Py_TYPE(value)->tp_basicsize + Py_SIZE(value);
        }
        else {
            *bytes = checked_size(PyObject_CallOneArg(sys_getsizeof, value), "sys.getsizeof");
        }
    }
    return *bytes < 0 ? -1 : 0;
}

enum { STORE_REPLACE, STORE_KEEP };

/*
 * Store value (of the size and bytes given) under key (hashed to hash) as the most recently used entry,
 * evicting least recently used entries first as the caps require. With STORE_KEEP, an entry
 * already under key stays as it is, and *kept receives its value (a new reference).
 *
 * Returns 0 (stored or kept, or nothing done because the cache is closed and refuse_closed is
 * false), or -1 with an error set and the cache unchanged. The only Python code it runs is the
 * lookup's (a key's __eq__), before any change. On success, *old is the value replaced (to
 * release), the nodes evicted are in taken, and the caller must call finish().
 */
static int
store(Core *c, PyObject *key, Py_hash_t hash, PyObject *value, Py_ssize_t size,
      Py_ssize_t bytes, int mode, int refuse_closed, PyObject **kept, PyObject **old,
      Taken *taken)
{
    Node *n;
    if (index_find(c, key, hash, &n) < 0) {
        return -1;
    }
    /* No Python code from here on. */
    if (c->closed) {
        if (refuse_closed) {
            PyErr_Format(closed_error, "%s is closed", short_name((PyObject *)c));
            return -1;
        }
        return 0;
    }
    if (n != NULL && mode == STORE_KEEP) {
        *kept = Py_NewRef(n->value);
        return 0;
    }
    /* What the cache would hold besides the new entry. */
    Py_ssize_t others = c->total - (n != NULL ? n->size : 0);
    Py_ssize_t mem_others = c->mem_total - (n != NULL ? n->bytes : 0);
    Py_ssize_t entries = c->linked + (n == NULL);
    if (c->max_total < 0 && size > PY_SSIZE_T_MAX - others) {
        PyErr_Format(PyExc_OverflowError,
                     "cannot store a value of size %zd: the cache's size (%zd) would pass "
                     "sys.maxsize",
                     size, c->total);
        return -1;
    }
    if (bytes > PY_SSIZE_T_MAX - mem_others) {
        /* Only the evictions for the caps below could make room: count the bytes they would
           free, changing nothing (a store refused must evict nothing). They take the nodes
           least recently used first, skipping n, while the new entry is over a cap. */
        Py_ssize_t o = others, e = entries, m = mem_others;
        for (Node *v = c->root.next; v != &c->root; v = v->next) {
            int over = (c->max_total >= 0 && size > c->max_total - o) ||
                       (c->max_entries >= 0 && e > c->max_entries);
            if (!over) {
                break;
            }
            if (v != n) {
                o -= v->size;
                e--;
                m -= v->bytes;
            }
        }
        if (bytes > PY_SSIZE_T_MAX - m) {
            PyErr_Format(PyExc_OverflowError,
                         "cannot store a value of %zd bytes: the cache's bytes (%zd) would pass "
                         "sys.maxsize",
                         bytes, c->mem_total);
            return -1;
        }
    }
    Node *fresh = NULL;
    if (n == NULL) {
        if (index_reserve(c) < 0) {
            return -1;
        }
        fresh = PyMem_Malloc(sizeof(Node));
        if (fresh == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    /* Nothing fails from here on. Evict first: the cache never holds more than its caps. */
    for (;;) {
        int over = (c->max_total >= 0 && size > c->max_total - others) ||
                   (c->max_entries >= 0 && entries > c->max_entries);
        if (!over) {
            break;
        }
        Node *lru = c->root.next;
        if (lru == n) {
            lru = lru->next;
        }
        if (lru == &c->root) {
            break; /* the new entry alone: callers checked that it fits */
        }
        others -= lru->size;
        entries--;
        take_out(c, lru, taken);
        c->evictions++;
    }
    if (n != NULL) {
        *old = n->value;
        n->value = Py_NewRef(value);
        c->total += size - n->size;
        n->size = size;
        c->mem_total += bytes - n->bytes;
        n->bytes = bytes;
        move_mru(c, n);
        return 0;
    }
    fresh->key = Py_NewRef(key);
    fresh->value = Py_NewRef(value);
    fresh->hash = hash;
    fresh->size = size;
    fresh->bytes = bytes;
    index_put(c, fresh);
    link_mru(c, fresh);
    c->total += size;
    c->mem_total += bytes;
    c->linked++;
    return 0;
}

/* A KeyError(key), even when key is a tuple (PyErr_SetObject would unpack it). Returns NULL. */
static PyObject *
set_key_error(PyObject *key)
{
    PyObject *exc = PyObject_CallOneArg(PyExc_KeyError, key);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_KeyError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/*
 * New references to every key and value, least recently used first, in a PyMem array of
 * 2 * *count objects (key, value, key, value...). No Python code runs while the list is read.
 * Returns NULL with MemoryError set (or NULL with *count == 0 for an empty cache).
 */
static PyObject **
snapshot(Core *c, Py_ssize_t *count)
{
    *count = c->linked;
    if (*count == 0) {
        return NULL;
    }
    PyObject **items = PyMem_New(PyObject *, 2 * (size_t)*count);
    if (items == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    Py_ssize_t i = 0;
    for (Node *n = c->root.next; n != &c->root; n = n->next) {
        items[i++] = Py_NewRef(n->key);
        items[i++] = Py_NewRef(n->value);
    }
    return items;
}

static void
snapshot_free(PyObject **items, Py_ssize_t count)
{
    for (Py_ssize_t i = 0; i < 2 * count; i++) {
        Py_DECREF(items[i]);
    }
    PyMem_Free(items);
}

/* --------------------------------------------------------------------- the shared base type */

static PyObject *
base_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    Core *c = (Core *)type->tp_alloc(type, 0);
    if (c == NULL) {
        return NULL;
    }
    c->root.prev = &c->root;
    c->root.next = &c->root;
    c->slots = PyMem_Calloc(INDEX_MIN, sizeof(Slot));
    if (c->slots == NULL) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    c->mask = INDEX_MIN - 1;
    c->max_total = -1;
    c->max_entries = -1;
    c->sync_lo = PY_SSIZE_T_MIN;
    c->sync_hi = PY_SSIZE_T_MAX;
    return (PyObject *)c;
}

static int
base_traverse(Core *c, visitproc visit, void *arg)
{
    /* Nodes are not Python objects: their references are this object's. Nodes taken out by an
       operation still running are not visited: the collector then just sees more references. */
    for (Node *n = c->root.next; n != NULL && n != &c->root; n = n->next) {
        Py_VISIT(n->key);
        Py_VISIT(n->value);
    }
    Py_VISIT(c->getsizeof);
    Py_VISIT(c->memsize);
    return 0;
}

static int
base_clear(Core *c)
{
    Taken taken = TAKEN_INIT;
    take_all(c, &taken);
    Py_CLEAR(c->getsizeof);
    Py_CLEAR(c->memsize);
    c->size_mode = SIZE_ONE;
    c->mem_mode = MEM_ESTIMATE;
    release(&taken, NULL);
    return 0;
}

static void
base_dealloc(Core *c)
{
    /* Values' finalizers run below: they must find no exception set, and the one pending now
       (this object may be freed while an exception propagates) must still be pending after. */
    SavedError saved;
    save_error(&saved);
    PyObject_GC_UnTrack(c);
    base_clear(c);
    PyMem_Free(c->slots);
    c->slots = NULL;
    Py_TYPE(c)->tp_free((PyObject *)c);
    restore_error(&saved);
}

static PyObject *
base_configure(Core *c, PyObject *args)
{
    Py_ssize_t max_total, max_entries;
    PyObject *getsizeof, *memsize;
    int size_method, notify;
    if (!PyArg_ParseTuple(args, "nnOpOp:_configure", &max_total, &max_entries, &getsizeof,
                          &size_method, &memsize, &notify)) {
        return NULL;
    }
    if ((getsizeof != Py_None && !PyCallable_Check(getsizeof)) ||
        (memsize != Py_None && !PyCallable_Check(memsize))) {
        PyErr_SetString(PyExc_TypeError, "getsizeof and memsize must be callable or None");
        return NULL;
    }
    if (c->linked > 0) {
        PyErr_SetString(PyExc_RuntimeError, "_configure() on a cache that holds entries");
        return NULL;
    }
    c->max_total = max_total < 0 ? -1 : max_total;
    c->max_entries = max_entries < 0 ? -1 : max_entries;
    c->size_mode = size_method ? SIZE_METHOD : getsizeof != Py_None ? SIZE_CALL : SIZE_ONE;
    c->mem_mode = memsize == Py_None                            ? MEM_ESTIMATE
                  : (memsize == getsizeof && !size_method)      ? MEM_SIZE
                                                                : MEM_CALL;
    Py_XSETREF(c->getsizeof, c->size_mode == SIZE_CALL ? Py_NewRef(getsizeof) : NULL);
    Py_XSETREF(c->memsize, c->mem_mode == MEM_CALL ? Py_NewRef(memsize) : NULL);
    c->notify = notify;
    Py_RETURN_NONE;
}

static PyObject *
base_evict_chunks(Core *c, PyObject *args)
{
    Py_ssize_t chunks, chunk_size;
    int collect;
    if (!PyArg_ParseTuple(args, "nnp:_evict_chunks", &chunks, &chunk_size, &collect)) {
        return NULL;
    }
    if (chunks < 0 || chunk_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "chunks must be >= 0 and chunk_size > 0");
        return NULL;
    }
    /* Down to (held - chunks) whole chunks, held = ceil(mem_total / chunk_size). */
    Py_ssize_t held = c->mem_total / chunk_size + (c->mem_total % chunk_size != 0);
    Py_ssize_t keep = held > chunks ? held - chunks : 0;
    Py_ssize_t target = keep > PY_SSIZE_T_MAX / chunk_size ? PY_SSIZE_T_MAX : keep * chunk_size;
    Py_ssize_t before = c->mem_total;
    Taken taken = TAKEN_INIT;
    while (c->mem_total > target && c->root.next != &c->root) {
        take_out(c, c->root.next, &taken);
    }
    index_maybe_shrink(c);
    Py_ssize_t count = taken.count;
    Py_ssize_t freed = before - c->mem_total;
    /* The entries are gone whatever happens now: a failure to list them loses the on_evict
       calls, and is raised after the release. */
    PyObject *pairs = NULL;
    if (collect && count > 0) {
        pairs = taken_pairs(&taken);
    }
    else {
        pairs = Py_NewRef(Py_None);
    }
    release(&taken, NULL);
    if (pairs == NULL) {
        return NULL;
    }
    return Py_BuildValue("nnN", count, freed, pairs);
}

static PyObject *
base_clear_method(Core *c, PyObject *Py_UNUSED(ignored))
{
    Taken taken = TAKEN_INIT;
    take_all(c, &taken);
    if (finish(c, NULL, &taken, 0) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
base_items(Core *c, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t count;
    PyObject **items = snapshot(c, &count);
    if (items == NULL && count > 0) {
        return NULL;
    }
    PyObject *list = PyList_New(count);
    for (Py_ssize_t i = 0; list != NULL && i < count; i++) {
        PyObject *pair = PyTuple_Pack(2, items[2 * i], items[2 * i + 1]);
        if (pair == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, pair);
    }
    if (items != NULL) {
        snapshot_free(items, count);
    }
    return list;
}

static PyObject *
base_len(Core *c, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(c->linked);
}

static PyObject *
base_reset_stats(Core *c, PyObject *Py_UNUSED(ignored))
{
    c->hits = 0;
    c->misses = 0;
    Py_RETURN_NONE;
}

static PyObject *
base_check(Core *c, PyObject *Py_UNUSED(ignored))
{
    /* For the tests: the invariants, checked from the C side. */
    Py_ssize_t count = 0, total = 0, mem_total = 0, used = 0, filled = 0;
    for (Node *n = c->root.next; n != &c->root; n = n->next) {
        if (n->next->prev != n || n->prev->next != n) {
            PyErr_SetString(PyExc_AssertionError, "order list broken");
            return NULL;
        }
        if (n->slot > c->mask || c->slots[n->slot].node != n || c->slots[n->slot].hash != n->hash) {
            PyErr_SetString(PyExc_AssertionError, "a node is not where the index says");
            return NULL;
        }
        if (n->size < 0 || total > PY_SSIZE_T_MAX - n->size || n->bytes < 0 ||
            mem_total > PY_SSIZE_T_MAX - n->bytes) {
            PyErr_SetString(PyExc_AssertionError, "sizes do not sum");
            return NULL;
        }
        total += n->size;
        mem_total += n->bytes;
        count++;
    }
    for (size_t i = 0; i <= c->mask; i++) {
        if (c->slots[i].node != NULL) {
            filled++;
            if (c->slots[i].node != TOMBSTONE) {
                used++;
            }
        }
    }
    if (count != c->linked || used != c->linked || filled != c->filled || total != c->total ||
        mem_total != c->mem_total) {
        PyErr_Format(PyExc_AssertionError,
                     "counts disagree: %zd listed, %zd indexed, %zd linked; %zd filled of %zd "
                     "counted; total %zd summed, %zd kept; bytes %zd summed, %zd kept",
                     count, used, c->linked, filled, c->filled, total, c->total, mem_total,
                     c->mem_total);
        return NULL;
    }
    if ((size_t)c->filled * 3 > (c->mask + 1) * 2) {
        PyErr_SetString(PyExc_AssertionError, "index over two thirds full");
        return NULL;
    }
    if ((c->max_total >= 0 && c->total > c->max_total) ||
        (c->max_entries >= 0 && c->linked > c->max_entries)) {
        PyErr_SetString(PyExc_AssertionError, "over a cap");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef base_methods[] = {
    {"_configure", (PyCFunction)base_configure, METH_VARARGS,
     "_configure(max_total, max_entries, getsizeof, notify): caps (-1: none), sizer (None: "
     "sys.getsizeof) and whether to call self._evicted(pairs) after evictions for a cap."},
    {"_evict_chunks", (PyCFunction)base_evict_chunks, METH_VARARGS,
     "_evict_chunks(chunks, chunk_size, collect) -> (entries, bytes, pairs or None): evict least "
     "recently used entries until ceil(total / chunk_size) has dropped by chunks (or all are "
     "gone). Calls no hook."},
    {"_clear", (PyCFunction)base_clear_method, METH_NOARGS, "Remove every entry."},
    {"_items", (PyCFunction)base_items, METH_NOARGS,
     "A list of (key, value) pairs, least recently used first; recency is not changed."},
    {"_len", (PyCFunction)base_len, METH_NOARGS, "The number of entries."},
    {"_reset_stats", (PyCFunction)base_reset_stats, METH_NOARGS, "Zero the hit and miss counts."},
    {"_check", (PyCFunction)base_check, METH_NOARGS,
     "Check the structure's invariants (for tests); raises AssertionError if one fails."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef base_members[] = {
    {"_total", T_PYSSIZET, offsetof(Core, total), READONLY, "Sum of the entries' sizes."},
    {"_mem_total", T_PYSSIZET, offsetof(Core, mem_total), READONLY,
     "Sum of the entries' bytes (what the chunks count)."},
    {"_max_total", T_PYSSIZET, offsetof(Core, max_total), READONLY, "Cap on the total, or -1."},
    {"_max_entries", T_PYSSIZET, offsetof(Core, max_entries), READONLY,
     "Cap on the entries, or -1."},
    {"_hits", T_PYSSIZET, offsetof(Core, hits), READONLY, "Lookups that found their key."},
    {"_misses", T_PYSSIZET, offsetof(Core, misses), READONLY, "Lookups that did not."},
    {"_evictions", T_PYSSIZET, offsetof(Core, evictions), READONLY,
     "Entries evicted to respect a cap."},
    {"_sync_lo", T_PYSSIZET, offsetof(Core, sync_lo), 0, "self._sync() runs below this total."},
    {"_sync_hi", T_PYSSIZET, offsetof(Core, sync_hi), 0, "self._sync() runs above this total."},
    {"_closed", T_INT, offsetof(Core, closed), 0, "Nonzero once closed."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyshrinker._lru._Base",
    .tp_doc = "Sized entries in an LRU list and an index; the machinery both front ends share.",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = base_new,
    .tp_dealloc = (destructor)base_dealloc,
    .tp_traverse = (traverseproc)base_traverse,
    .tp_clear = (inquiry)base_clear,
    .tp_methods = base_methods,
    .tp_members = base_members,
};

/* ------------------------------------------------------------------------ the mapping type */

/* The node under key (NULL: absent), or -1 with an error set: hashes and looks up. */
static inline int
find_key(Core *c, PyObject *key, Node **found)
{
    Py_hash_t hash = PyObject_Hash(key);
    if (hash == -1) {
        return -1;
    }
    return index_find(c, key, hash, found);
}

static PyObject *
core_subscript(Core *c, PyObject *key)
{
    Node *n;
    if (find_key(c, key, &n) < 0) {
        return NULL;
    }
    if (n != NULL) {
        move_mru(c, n);
        c->hits++;
        return Py_NewRef(n->value);
    }
    c->misses++;
    return PyObject_CallMethodOneArg((PyObject *)c, str_missing, key);
}

static int
core_delete(Core *c, PyObject *key)
{
    Node *n;
    if (find_key(c, key, &n) < 0) {
        return -1;
    }
    if (n == NULL) {
        set_key_error(key);
        return -1;
    }
    Taken taken = TAKEN_INIT;
    take_out(c, n, &taken);
    return finish(c, NULL, &taken, 0);
}

static int
core_set(Core *c, PyObject *key, PyObject *value)
{
    if (c->closed) {
        PyErr_Format(closed_error, "%s is closed", short_name((PyObject *)c));
        return -1;
    }
    Py_ssize_t size, bytes;
    if (entry_sizes(c, value, &size, &bytes) < 0) {
        return -1;
    }
    if (c->max_total >= 0 && size > c->max_total) {
        PyErr_SetString(PyExc_ValueError, "value too large");
        return -1;
    }
    Py_hash_t hash = PyObject_Hash(key);
    if (hash == -1) {
        return -1;
    }
    Taken taken = TAKEN_INIT;
    PyObject *old = NULL;
    if (store(c, key, hash, value, size, bytes, STORE_REPLACE, 1, NULL, &old, &taken) < 0) {
        return -1;
    }
    return finish(c, old, &taken, 1);
}

static int
core_ass_subscript(Core *c, PyObject *key, PyObject *value)
{
    if (value == NULL) {
        return core_delete(c, key);
    }
    return core_set(c, key, value);
}

static Py_ssize_t
core_length(Core *c)
{
    return c->linked;
}

static int
core_contains(Core *c, PyObject *key)
{
    Node *n;
    if (find_key(c, key, &n) < 0) {
        return -1;
    }
    return n != NULL;
}

static PyObject *
core_iter(Core *c)
{
    Py_ssize_t count;
    PyObject **items = snapshot(c, &count);
    if (items == NULL && count > 0) {
        return NULL;
    }
    PyObject *keys = PyList_New(count);
    if (keys != NULL) {
        for (Py_ssize_t i = 0; i < count; i++) {
            PyList_SET_ITEM(keys, i, Py_NewRef(items[2 * i]));
        }
    }
    if (items != NULL) {
        snapshot_free(items, count);
    }
    if (keys == NULL) {
        return NULL;
    }
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

/* Parse (key[, default]) given positionally or default= by keyword. */
static int
parse_key_default(const char *name, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                  PyObject **key, PyObject **dflt)
{
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        if (nkw > 1 || nargs != 1 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) ||
            PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "default") != 0) {
            PyErr_Format(PyExc_TypeError, "%s() takes a key and an optional default", name);
            return -1;
        }
        *key = args[0];
        *dflt = args[1];
        return 0;
    }
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes a key and an optional default", name);
        return -1;
    }
    *key = args[0];
    if (nargs == 2) {
        *dflt = args[1];
    }
    return 0;
}

static PyObject *
core_get(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key, *dflt = Py_None;
    if (kwnames == NULL && nargs == 1) {
        key = args[0];
    }
    else if (parse_key_default("get", args, nargs, kwnames, &key, &dflt) < 0) {
        return NULL;
    }
    Node *n;
    if (find_key(c, key, &n) < 0) {
        return NULL;
    }
    if (n != NULL) {
        move_mru(c, n);
        c->hits++;
        return Py_NewRef(n->value);
    }
    c->misses++;
    return Py_NewRef(dflt);
}

static PyObject *
core_peek(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key, *dflt = Py_None;
    if (parse_key_default("_peek", args, nargs, kwnames, &key, &dflt) < 0) {
        return NULL;
    }
    Node *n;
    if (find_key(c, key, &n) < 0) {
        return NULL;
    }
    return Py_NewRef(n != NULL ? n->value : dflt);
}

static PyObject *
core_pop(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key, *dflt = NULL;
    if (parse_key_default("pop", args, nargs, kwnames, &key, &dflt) < 0) {
        return NULL;
    }
    Node *n;
    if (find_key(c, key, &n) < 0) {
        return NULL;
    }
    if (n == NULL) {
        if (dflt != NULL) {
            return Py_NewRef(dflt);
        }
        return set_key_error(key);
    }
    PyObject *value = Py_NewRef(n->value);
    Taken taken = TAKEN_INIT;
    take_out(c, n, &taken);
    if (finish(c, NULL, &taken, 0) < 0) {
        Py_DECREF(value);
        return NULL;
    }
    return value;
}

static PyObject *
core_popitem(Core *c, PyObject *Py_UNUSED(ignored))
{
    /* The pair is allocated before the entry is chosen: allocating may run a collection, and so
       finalizers that change the cache. */
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        return NULL;
    }
    Node *n = c->root.next;
    if (n == &c->root) {
        Py_DECREF(pair);
        PyObject *msg = PyUnicode_FromFormat("%s is empty", short_name((PyObject *)c));
        if (msg == NULL) {
            return NULL;
        }
        PyObject *exc = PyObject_CallOneArg(PyExc_KeyError, msg);
        Py_DECREF(msg);
        if (exc == NULL) {
            return NULL;
        }
        /* As cachetools does with "raise KeyError(...) from None". */
        PyException_SetCause(exc, NULL);
        PyErr_SetObject(PyExc_KeyError, exc);
        Py_DECREF(exc);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, Py_NewRef(n->key));
    PyTuple_SET_ITEM(pair, 1, Py_NewRef(n->value));
    Taken taken = TAKEN_INIT;
    take_out(c, n, &taken);
    if (finish(c, NULL, &taken, 0) < 0) {
        Py_DECREF(pair);
        return NULL;
    }
    return pair;
}

static PyObject *
core_setdefault(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key, *dflt = Py_None;
    if (parse_key_default("setdefault", args, nargs, kwnames, &key, &dflt) < 0) {
        return NULL;
    }
    Py_hash_t hash = PyObject_Hash(key);
    if (hash == -1) {
        return NULL;
    }
    Node *n;
    if (index_find(c, key, hash, &n) < 0) {
        return NULL;
    }
    if (n != NULL) {
        move_mru(c, n);
        return Py_NewRef(n->value);
    }
    if (c->closed) {
        PyErr_Format(closed_error, "%s is closed", short_name((PyObject *)c));
        return NULL;
    }
    Py_ssize_t size, bytes;
    if (entry_sizes(c, dflt, &size, &bytes) < 0) {
        return NULL;
    }
    if (c->max_total >= 0 && size > c->max_total) {
        PyErr_SetString(PyExc_ValueError, "value too large");
        return NULL;
    }
    /* getsizeof may have stored the key meanwhile: then that entry stays, as in a dict. */
    Taken taken = TAKEN_INIT;
    PyObject *old = NULL, *kept = NULL;
    if (store(c, key, hash, dflt, size, bytes, STORE_KEEP, 1, &kept, &old, &taken) < 0) {
        return NULL;
    }
    if (finish(c, old, &taken, 1) < 0) {
        Py_XDECREF(kept);
        return NULL;
    }
    return kept != NULL ? kept : Py_NewRef(dflt);
}

/* (key, value, size, bytes) of every entry, least recently used first; recency unchanged. */
static PyObject *
core_entries(Core *c, PyObject *Py_UNUSED(ignored))
{
    /* The snapshot and the sizes are read together while no Python code can run; the tuples
       are made afterwards (an allocation may run a collection, and finalizers that change the
       cache: the result is the cache as it was when read). */
    Py_ssize_t count = c->linked;
    Py_ssize_t *raw = PyMem_New(Py_ssize_t, 2 * (size_t)(count > 0 ? count : 1));
    if (raw == NULL) {
        return PyErr_NoMemory();
    }
    Py_ssize_t i = 0;
    for (Node *n = c->root.next; n != &c->root; n = n->next, i++) {
        raw[2 * i] = n->size;
        raw[2 * i + 1] = n->bytes;
    }
    PyObject **items = snapshot(c, &count);
    if (items == NULL && count > 0) {
        PyMem_Free(raw);
        return NULL;
    }
    PyObject *list = PyList_New(count);
    for (i = 0; list != NULL && i < count; i++) {
        PyObject *entry = Py_BuildValue("OOnn", items[2 * i], items[2 * i + 1], raw[2 * i],
                                        raw[2 * i + 1]);
        if (entry == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, entry);
    }
    PyMem_Free(raw);
    if (items != NULL) {
        snapshot_free(items, count);
    }
    return list;
}

/* _put(key, value, size, bytes): store as self[key] = value does, with the sizes given. */
static PyObject *
core_put(Core *c, PyObject *args)
{
    PyObject *key, *value;
    Py_ssize_t size, bytes;
    if (!PyArg_ParseTuple(args, "OOnn:_put", &key, &value, &size, &bytes)) {
        return NULL;
    }
    if (size < 0 || bytes < 0) {
        PyErr_SetString(PyExc_ValueError, "value size must be non-negative");
        return NULL;
    }
    if (c->closed) {
        PyErr_Format(closed_error, "%s is closed", short_name((PyObject *)c));
        return NULL;
    }
    if (c->max_total >= 0 && size > c->max_total) {
        PyErr_SetString(PyExc_ValueError, "value too large");
        return NULL;
    }
    Py_hash_t hash = PyObject_Hash(key);
    if (hash == -1) {
        return NULL;
    }
    Taken taken = TAKEN_INIT;
    PyObject *old = NULL;
    if (store(c, key, hash, value, size, bytes, STORE_REPLACE, 1, NULL, &old, &taken) < 0) {
        return NULL;
    }
    if (finish(c, old, &taken, 1) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
core_missing(Core *c, PyObject *key)
{
    (void)c;
    return set_key_error(key);
}

static PyMethodDef core_methods[] = {
    {"get", (PyCFunction)(void (*)(void))core_get, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None): the value under key (marked most recently used), or default."},
    {"_peek", (PyCFunction)(void (*)(void))core_peek, METH_FASTCALL | METH_KEYWORDS,
     "_peek(key, default=None): the value under key without marking it used or counting."},
    {"pop", (PyCFunction)(void (*)(void))core_pop, METH_FASTCALL | METH_KEYWORDS,
     "pop(key[, default]): remove the entry and return its value."},
    {"popitem", (PyCFunction)core_popitem, METH_NOARGS,
     "popitem(): remove and return the least recently used (key, value) pair."},
    {"setdefault", (PyCFunction)(void (*)(void))core_setdefault, METH_FASTCALL | METH_KEYWORDS,
     "setdefault(key, default=None): the value under key, storing default first if absent."},
    {"clear", (PyCFunction)base_clear_method, METH_NOARGS, "clear(): remove every entry."},
    {"_entries", (PyCFunction)core_entries, METH_NOARGS,
     "_entries(): (key, value, size, bytes) of every entry, least recently used first."},
    {"_put", (PyCFunction)core_put, METH_VARARGS,
     "_put(key, value, size, bytes): store as self[key] = value does, with these sizes."},
    {"__missing__", (PyCFunction)core_missing, METH_O,
     "Called by self[key] for a missing key; raises KeyError(key). Override to compute."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef core_members[] = {
    {"currsize", T_PYSSIZET, offsetof(Core, total), READONLY,
     "The current size of the cache: the sum of getsizeof(value) over the entries."},
    {NULL, 0, 0, 0, NULL},
};

static PyMappingMethods core_as_mapping = {
    .mp_length = (lenfunc)core_length,
    .mp_subscript = (binaryfunc)core_subscript,
    .mp_ass_subscript = (objobjargproc)core_ass_subscript,
};

static PySequenceMethods core_as_sequence = {
    .sq_contains = (objobjproc)core_contains,
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyshrinker._lru.LRUCore",
    .tp_doc = "The mapping core of ShrinkableLRU: an LRU of sized entries.",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_base = &BaseType,
    .tp_new = base_new,
    .tp_dealloc = (destructor)base_dealloc,
    .tp_traverse = (traverseproc)base_traverse,
    .tp_clear = (inquiry)base_clear,
    .tp_as_mapping = &core_as_mapping,
    .tp_as_sequence = &core_as_sequence,
    .tp_iter = (getiterfunc)core_iter,
    .tp_methods = core_methods,
    .tp_members = core_members,
};

/* ----------------------------------------------------------------------- the function type */

/* The key functools.lru_cache builds, built the same way (so the same calls share entries). */
static PyObject *
make_call_key(PyObject *args, PyObject *kwds, int typed)
{
    Py_ssize_t kwds_size = kwds ? PyDict_GET_SIZE(kwds) : 0;
    if (!typed && !kwds_size) {
        if (PyTuple_GET_SIZE(args) == 1) {
            PyObject *key = PyTuple_GET_ITEM(args, 0);
            if (PyUnicode_CheckExact(key) || PyLong_CheckExact(key)) {
                return Py_NewRef(key);
            }
        }
        return Py_NewRef(args);
    }
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    Py_ssize_t key_size = nargs;
    if (kwds_size) {
        key_size += kwds_size * 2 + 1;
    }
    if (typed) {
        key_size += nargs + kwds_size;
    }
    PyObject *key = PyTuple_New(key_size);
    if (key == NULL) {
        return NULL;
    }
    Py_ssize_t pos = 0, i;
    PyObject *keyword, *value;
    for (i = 0; i < nargs; i++) {
        PyTuple_SET_ITEM(key, pos++, Py_NewRef(PyTuple_GET_ITEM(args, i)));
    }
    if (kwds_size) {
        PyTuple_SET_ITEM(key, pos++, Py_NewRef(kwd_mark));
        for (i = 0; PyDict_Next(kwds, &i, &keyword, &value);) {
            PyTuple_SET_ITEM(key, pos++, Py_NewRef(keyword));
            PyTuple_SET_ITEM(key, pos++, Py_NewRef(value));
        }
    }
    if (typed) {
        for (i = 0; i < nargs; i++) {
            PyTuple_SET_ITEM(key, pos++, Py_NewRef((PyObject *)Py_TYPE(PyTuple_GET_ITEM(args, i))));
        }
        if (kwds_size) {
            for (i = 0; PyDict_Next(kwds, &i, &keyword, &value);) {
                PyTuple_SET_ITEM(key, pos++, Py_NewRef((PyObject *)Py_TYPE(value)));
            }
        }
    }
    return key;
}

static PyObject *
func_call(CachedFunc *self, PyObject *args, PyObject *kwds)
{
    Core *c = &self->core;
    if (self->func == NULL) {
        PyErr_SetString(PyExc_TypeError, "cached function is not configured");
        return NULL;
    }
    if (c->max_entries == 0 || c->closed) {
        c->misses++;
        return PyObject_Call(self->func, args, kwds);
    }
    PyObject *key = make_call_key(args, kwds, self->typed);
    if (key == NULL) {
        return NULL;
    }
    Py_hash_t hash = PyObject_Hash(key);
    if (hash == -1) {
        Py_DECREF(key);
        return NULL;
    }
    Node *n;
    if (index_find(c, key, hash, &n) < 0) {
        Py_DECREF(key);
        return NULL;
    }
    if (n != NULL) {
        move_mru(c, n);
        c->hits++;
        Py_DECREF(key);
        return Py_NewRef(n->value);
    }
    c->misses++;
    PyObject *result = PyObject_Call(self->func, args, kwds);
    if (result == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    Py_ssize_t size, bytes;
    if (entry_sizes(c, result, &size, &bytes) < 0) {
        Py_DECREF(key);
        Py_DECREF(result);
        return NULL;
    }
    /* The call may have stored the same key (recursion, another thread): as functools does,
       keep that entry and return this result. A closed cache stores nothing. */
    Taken taken = TAKEN_INIT;
    PyObject *old = NULL, *kept = NULL;
    int rc = store(c, key, hash, result, size, bytes, STORE_KEEP, 0, &kept, &old, &taken);
    Py_DECREF(key);
    Py_XDECREF(kept);
    if (rc == 0) {
        rc = finish(c, old, &taken, 1);
    }
    if (rc < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *
func_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    (void)type;
    if (obj == Py_None || obj == NULL) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyObject *
func_set_function(CachedFunc *self, PyObject *args)
{
    PyObject *func;
    int typed;
    if (!PyArg_ParseTuple(args, "Op:_set_function", &func, &typed)) {
        return NULL;
    }
    if (!PyCallable_Check(func)) {
        PyErr_SetString(PyExc_TypeError, "the first argument must be callable");
        return NULL;
    }
    Py_XSETREF(self->func, Py_NewRef(func));
    self->typed = typed;
    Py_RETURN_NONE;
}

static int
func_traverse(CachedFunc *self, visitproc visit, void *arg)
{
    Py_VISIT(self->func);
    return base_traverse(&self->core, visit, arg);
}

static int
func_clear(CachedFunc *self)
{
    Py_CLEAR(self->func);
    return base_clear(&self->core);
}

static void
func_dealloc(CachedFunc *self)
{
    SavedError saved;
    save_error(&saved);
    PyObject_GC_UnTrack(self);
    func_clear(self);
    PyMem_Free(self->core.slots);
    self->core.slots = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
    restore_error(&saved);
}

static PyMethodDef func_methods[] = {
    {"_set_function", (PyCFunction)func_set_function, METH_VARARGS,
     "_set_function(func, typed): the function to cache and whether argument types count."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FuncType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyshrinker._lru.LRUFunction",
    .tp_doc = "The core of a @shrinkable_cache function: calls keyed as functools.lru_cache does.",
    .tp_basicsize = sizeof(CachedFunc),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_base = &BaseType,
    .tp_new = base_new,
    .tp_dealloc = (destructor)func_dealloc,
    .tp_traverse = (traverseproc)func_traverse,
    .tp_clear = (inquiry)func_clear,
    .tp_call = (ternaryfunc)func_call,
    .tp_descr_get = func_descr_get,
    .tp_methods = func_methods,
};

/* ------------------------------------------------------------------------------------ module */

static struct PyModuleDef lru_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pyshrinker._lru",
    .m_doc = "The C core of pyshrinker.lru: LRU entries with sizes, hot paths in C.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__lru(void)
{
    if (PyType_Ready(&BaseType) < 0 || PyType_Ready(&CoreType) < 0 ||
        PyType_Ready(&FuncType) < 0) {
        return NULL;
    }
    PyObject *sys = PyImport_ImportModule("sys");
    if (sys == NULL) {
        return NULL;
    }
    sys_getsizeof = PyObject_GetAttrString(sys, "getsizeof");
    Py_DECREF(sys);
    if (sys_getsizeof == NULL) {
        return NULL;
    }
    PyObject *errors = PyImport_ImportModule("pyshrinker.errors");
    if (errors == NULL) {
        return NULL;
    }
    closed_error = PyObject_GetAttrString(errors, "ClosedError");
    Py_DECREF(errors);
    if (closed_error == NULL) {
        return NULL;
    }
    kwd_mark = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    str_missing = PyUnicode_InternFromString("__missing__");
    str_sync = PyUnicode_InternFromString("_sync");
    str_evicted = PyUnicode_InternFromString("_evicted");
    str_getsizeof = PyUnicode_InternFromString("getsizeof");
    if (kwd_mark == NULL || str_missing == NULL || str_sync == NULL || str_evicted == NULL ||
        str_getsizeof == NULL) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&lru_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "_Base", (PyObject *)&BaseType) < 0 ||
        PyModule_AddObjectRef(m, "LRUCore", (PyObject *)&CoreType) < 0 ||
        PyModule_AddObjectRef(m, "LRUFunction", (PyObject *)&FuncType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
