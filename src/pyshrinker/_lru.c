/*
 * pyshrinker._lru: the C core of ShrinkableLRU and @shrinkable_cache.
 *
 * Why C. Measured on CPython 3.11 (benchmarks/lru.py): a pure-Python LRU that takes a lock and
 * keeps sizes on every set cannot come near cachetools.LRUCache's speed times 0.55, because even a
 * plain OrderedDict LRU with no lock and no sizes is at 0.55-0.65 of it: the Python frame of
 * get() alone costs more than the whole budget. So the hot paths (get, [], []=, del, in, len, and
 * a cached function's call) are C, in the manner of functools.lru_cache's own C implementation,
 * and everything that is rare (reporting chunks to the controller, notifying evictions, reclaim
 * bookkeeping) stays in Python (pyshrinker.lru), called from here through two hook methods.
 *
 * Structure. A dict maps each key to a Node; nodes form a circular doubly-linked list through a
 * sentinel (root), least recently used first. Each node carries the value, the key's hash and the
 * entry's size; the object keeps the sum of sizes (total) and the count of linked nodes.
 * Reference ownership follows functools: the dict holds one reference to a node and the list holds
 * another, so clearing the dict (which the GC may do first) never leaves the list dangling.
 *
 * Thread safety. Every operation runs under the GIL, and between two calls out to Python code the
 * structure is always consistent. Python code can run in only these places: a key's __hash__ or
 * __eq__ inside a dict operation, the user's getsizeof, the hooks, the cached function itself, and
 * the release of references (a value's __del__). Another thread may run at any of those points.
 * The rules that keep that safe:
 *   - every dict value is a linked node ("dict => linked"): a node is linked right after it is
 *     stored in the dict, with no Python code in between, and it is unlinked only after its dict
 *     entry is gone;
 *   - a node found linked but no longer in the dict (an "orphan", possible only when another
 *     thread stored the same key during one of our dict calls) is simply unlinked when evicted;
 *   - references are released only at the end of an operation (the Evicted list), when the
 *     structure is consistent again; hooks are called at the end too.
 *
 * On a free-threaded build this module does not declare itself GIL-free, so importing it turns the
 * GIL back on.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#if PY_VERSION_HEX < 0x030D0000
/* Known-hash dict calls avoid hashing (and a Python __hash__) again; public until 3.12. */
#define LRU_KNOWN_HASH 1
#endif

static PyObject *sys_getsizeof;   /* sys.getsizeof */
static PyObject *closed_error;    /* pyshrinker.errors.ClosedError */
static PyObject *kwd_mark;        /* separates positional and keyword arguments in call keys */
static PyObject *str_missing;     /* "__missing__" */
static PyObject *str_sync;        /* "_sync" */
static PyObject *str_evicted;     /* "_evicted" */

/* ------------------------------------------------------------------------------------ nodes */

typedef struct Node {
    PyObject_HEAD
    struct Node *prev; /* NULL when not linked */
    struct Node *next;
    PyObject *key;
    PyObject *value;
    Py_hash_t hash;
    Py_ssize_t size;
} Node;

static void
node_dealloc(Node *self)
{
    Py_XDECREF(self->key);
    Py_XDECREF(self->value);
    PyObject_Free(self);
}

static PyTypeObject NodeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyshrinker._lru._Node",
    .tp_basicsize = sizeof(Node),
    .tp_dealloc = (destructor)node_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
};

/* ------------------------------------------------------------------------------------ object */

typedef struct {
    PyObject_HEAD
    PyObject *dict;          /* key -> Node */
    Node root;               /* sentinel: root.next is the LRU node, root.prev the MRU node */
    Py_ssize_t total;        /* sum of the sizes of linked nodes */
    Py_ssize_t linked;       /* linked nodes */
    Py_ssize_t max_total;    /* cap on total, -1 for none */
    Py_ssize_t max_entries;  /* cap on linked nodes, -1 for none */
    PyObject *getsizeof;     /* NULL: sys.getsizeof (with a fast path for exact bytes) */
    Py_ssize_t sync_lo;      /* call self._sync() when total < sync_lo or total > sync_hi */
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

/* Borrowed node for key, or NULL (error set, or a miss). */
static inline Node *
dict_lookup(Core *c, PyObject *key, Py_hash_t hash)
{
#ifdef LRU_KNOWN_HASH
    return (Node *)_PyDict_GetItem_KnownHash(c->dict, key, hash);
#else
    (void)hash;
    return (Node *)PyDict_GetItemWithError(c->dict, key);
#endif
}

static inline int
dict_store(Core *c, PyObject *key, Py_hash_t hash, Node *n)
{
#ifdef LRU_KNOWN_HASH
    return _PyDict_SetItem_KnownHash(c->dict, key, (PyObject *)n, hash);
#else
    (void)hash;
    return PyDict_SetItem(c->dict, key, (PyObject *)n);
#endif
}

static inline int
dict_remove(Core *c, PyObject *key, Py_hash_t hash)
{
#ifdef LRU_KNOWN_HASH
    return _PyDict_DelItem_KnownHash(c->dict, key, hash);
#else
    (void)hash;
    return PyDict_DelItem(c->dict, key);
#endif
}

/* Nodes taken out of the structure during one operation, released at its end. */
typedef struct {
    Node **items;
    Py_ssize_t len;
    Py_ssize_t cap;
    Node *small[16];
} Evicted;

static inline void
evicted_init(Evicted *ev)
{
    ev->items = ev->small;
    ev->len = 0;
    ev->cap = 16;
}

static int
evicted_push(Evicted *ev, Node *n)
{
    if (ev->len == ev->cap) {
        Py_ssize_t cap = ev->cap * 2;
        Node **items;
        if (ev->items == ev->small) {
            items = PyMem_Malloc(cap * sizeof(Node *));
            if (items != NULL) {
                memcpy(items, ev->small, ev->len * sizeof(Node *));
            }
        }
        else {
            items = PyMem_Realloc(ev->items, cap * sizeof(Node *));
        }
        if (items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        ev->items = items;
        ev->cap = cap;
    }
    ev->items[ev->len++] = n;
    return 0;
}

/* Release the nodes (this may run arbitrary code: do it last). */
static void
evicted_release(Evicted *ev)
{
    for (Py_ssize_t i = 0; i < ev->len; i++) {
        Py_DECREF(ev->items[i]);
    }
    if (ev->items != ev->small) {
        PyMem_Free(ev->items);
    }
    ev->items = ev->small;
    ev->len = 0;
    ev->cap = 16;
}

/* A list of (key, value) tuples for the evicted nodes, or NULL with an error set. */
static PyObject *
evicted_pairs(Evicted *ev)
{
    PyObject *pairs = PyList_New(ev->len);
    if (pairs == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < ev->len; i++) {
        PyObject *pair = PyTuple_Pack(2, ev->items[i]->key, ev->items[i]->value);
        if (pair == NULL) {
            Py_DECREF(pairs);
            return NULL;
        }
        PyList_SET_ITEM(pairs, i, pair);
    }
    return pairs;
}

/*
 * Take linked node n out of the dict and the list. On success the caller owns one reference to
 * n (to release at the end of its operation). Returns 0, or -1 with an error set and n untouched.
 */
static int
core_detach(Core *c, Node *n)
{
    Py_INCREF(n);
    Node *current = dict_lookup(c, n->key, n->hash);
    if (current == NULL && PyErr_Occurred()) {
        Py_DECREF(n); /* still referenced by the list: nothing is freed */
        return -1;
    }
    if (current == n) {
        if (dict_remove(c, n->key, n->hash) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                Py_DECREF(n);
                return -1;
            }
            PyErr_Clear(); /* removed by another thread meanwhile */
        }
    }
    if (n->prev != NULL) {
        unlink_node(n);
        c->total -= n->size;
        c->linked--;
        Py_DECREF(n); /* the list's reference; ours keeps it alive */
    }
    return 0;
}

/* Evict least recently used nodes (never `keep`) until both caps hold. */
static int
core_enforce_caps(Core *c, Node *keep, Evicted *ev)
{
    for (;;) {
        int over = (c->max_total >= 0 && c->total > c->max_total) ||
                   (c->max_entries >= 0 && c->linked > c->max_entries);
        if (!over) {
            return 0;
        }
        Node *lru = c->root.next;
        if (lru == &c->root || lru == keep) {
            return 0;
        }
        if (core_detach(c, lru) < 0) {
            return -1;
        }
        if (evicted_push(ev, lru) < 0) {
            Py_DECREF(lru);
            return -1;
        }
        c->evictions++;
    }
}

/*
 * Store value under key as the most recently used entry, then evict to the caps. *old receives
 * the value replaced (a reference for the caller to release), if any. With replace false, an
 * entry already under key is left as it is.
 */
static int
core_store(Core *c, PyObject *key, Py_hash_t hash, PyObject *value, Py_ssize_t size,
           int replace, PyObject **old, Evicted *ev)
{
    Node *n = dict_lookup(c, key, hash);
    if (n != NULL) {
        if (!replace) {
            return 0;
        }
        *old = n->value;
        n->value = Py_NewRef(value);
        c->total += size - n->size;
        n->size = size;
        move_mru(c, n);
        return core_enforce_caps(c, n, ev);
    }
    if (PyErr_Occurred()) {
        return -1;
    }
    n = PyObject_New(Node, &NodeType);
    if (n == NULL) {
        return -1;
    }
    n->prev = NULL;
    n->next = NULL;
    n->key = Py_NewRef(key);
    n->value = Py_NewRef(value);
    n->hash = hash;
    n->size = size;
    if (dict_store(c, key, hash, n) < 0) {
        Py_DECREF(n);
        return -1;
    }
    /* The dict took a reference; the one from PyObject_New is the list's. */
    link_mru(c, n);
    c->total += size;
    c->linked++;
    return core_enforce_caps(c, n, ev);
}

static Py_ssize_t
core_sizeof(Core *c, PyObject *value)
{
    PyObject *result;
    if (c->getsizeof == NULL) {
        if (PyBytes_CheckExact(value)) {
            /* What bytes.__sizeof__ (and so sys.getsizeof) returns: bytes are not GC-tracked. */
            return Py_TYPE(value)->tp_basicsize + Py_SIZE(value);
        }
        result = PyObject_CallOneArg(sys_getsizeof, value);
    }
    else {
        result = PyObject_CallOneArg(c->getsizeof, value);
    }
    if (result == NULL) {
        return -1;
    }
    Py_ssize_t size = PyNumber_AsSsize_t(result, PyExc_OverflowError);
    Py_DECREF(result);
    if (size == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "value size must be non-negative");
        return -1;
    }
    return size;
}

/*
 * End of a mutating operation: call the hooks (sync if total left its window, then evicted if
 * asked for), then release what the operation took out. Returns rc, or -1 if a hook failed.
 */
static int
core_finish(Core *c, int rc, int hooks, PyObject *old, Evicted *ev, int notify_evicted)
{
    PyObject *pairs = NULL;
    if (rc == 0 && notify_evicted && c->notify && ev->len > 0) {
        pairs = evicted_pairs(ev);
        if (pairs == NULL) {
            rc = -1;
        }
    }
    if (rc == 0 && hooks && (c->total < c->sync_lo || c->total > c->sync_hi)) {
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
    Py_XDECREF(old);
    evicted_release(ev);
    return rc;
}

static PyObject *
make_key_error(PyObject *key)
{
    /* KeyError(key) even when key is a tuple (PyErr_SetObject would unpack it). */
    PyObject *exc = PyObject_CallOneArg(PyExc_KeyError, key);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_KeyError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* The type's name without its module, as type(self).__name__ gives it. */
static const char *
short_name(PyObject *self)
{
    const char *name = Py_TYPE(self)->tp_name;
    const char *dot = strrchr(name, '.');
    return dot != NULL ? dot + 1 : name;
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
    c->dict = PyDict_New();
    if (c->dict == NULL) {
        Py_DECREF(c);
        return NULL;
    }
    c->root.prev = &c->root;
    c->root.next = &c->root;
    c->max_total = -1;
    c->max_entries = -1;
    c->sync_lo = PY_SSIZE_T_MIN;
    c->sync_hi = PY_SSIZE_T_MAX;
    return (PyObject *)c;
}

/* Unlink every node, empty the dict; the nodes go to ev. */
static int
core_take_all(Core *c, Evicted *ev)
{
    int rc = 0;
    Node *n = c->root.next;
    /* Empty the structure first; the detached chain still ends at &c->root. */
    c->root.next = &c->root;
    c->root.prev = &c->root;
    c->total = 0;
    c->linked = 0;
    while (n != &c->root) {
        Node *next = n->next;
        n->prev = NULL;
        n->next = NULL;
        if (rc == 0 && evicted_push(ev, n) < 0) {
            rc = -1;
        }
        if (rc < 0) {
            /* No room to keep it: drop the list's reference now. The dict still holds one
               until it is cleared below, so nothing is freed here. */
            Py_DECREF(n);
        }
        n = next;
    }
    if (c->dict != NULL) {
        PyDict_Clear(c->dict);
    }
    return rc;
}

static int
base_traverse(Core *c, visitproc visit, void *arg)
{
    /* Nodes are not GC-tracked: report their references as this object's. */
    for (Node *n = c->root.next; n != NULL && n != &c->root; n = n->next) {
        Py_VISIT(n->key);
        Py_VISIT(n->value);
    }
    Py_VISIT(c->dict);
    Py_VISIT(c->getsizeof);
    return 0;
}

static int
base_clear(Core *c)
{
    Evicted ev;
    evicted_init(&ev);
    (void)core_take_all(c, &ev);
    if (PyErr_Occurred()) {
        PyErr_Clear();
    }
    Py_CLEAR(c->getsizeof);
    evicted_release(&ev);
    return 0;
}

static void
base_dealloc(Core *c)
{
    PyObject_GC_UnTrack(c);
    base_clear(c);
    Py_CLEAR(c->dict);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *
base_configure(Core *c, PyObject *args)
{
    Py_ssize_t max_total, max_entries;
    PyObject *getsizeof;
    int notify;
    if (!PyArg_ParseTuple(args, "nnOp:_configure", &max_total, &max_entries, &getsizeof,
                          &notify)) {
        return NULL;
    }
    if (getsizeof != Py_None && !PyCallable_Check(getsizeof)) {
        PyErr_SetString(PyExc_TypeError, "getsizeof must be callable or None");
        return NULL;
    }
    c->max_total = max_total < 0 ? -1 : max_total;
    c->max_entries = max_entries < 0 ? -1 : max_entries;
    Py_XSETREF(c->getsizeof, getsizeof == Py_None ? NULL : Py_NewRef(getsizeof));
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
    /* Down to (held - chunks) whole chunks, held = ceil(total / chunk_size). */
    Py_ssize_t held = c->total / chunk_size + (c->total % chunk_size != 0);
    Py_ssize_t keep = held > chunks ? held - chunks : 0;
    Py_ssize_t target = keep > PY_SSIZE_T_MAX / chunk_size ? PY_SSIZE_T_MAX : keep * chunk_size;
    Py_ssize_t before = c->total;
    Evicted ev;
    evicted_init(&ev);
    int rc = 0;
    while (c->total > target && c->root.next != &c->root) {
        Node *lru = c->root.next;
        if (core_detach(c, lru) < 0) {
            rc = -1;
            break;
        }
        if (evicted_push(&ev, lru) < 0) {
            Py_DECREF(lru);
            rc = -1;
            break;
        }
    }
    PyObject *pairs = NULL;
    if (rc == 0 && collect) {
        pairs = evicted_pairs(&ev);
        if (pairs == NULL) {
            rc = -1;
        }
    }
    Py_ssize_t count = ev.len;
    Py_ssize_t freed = before - c->total;
    evicted_release(&ev);
    if (rc < 0) {
        return NULL;
    }
    if (pairs == NULL) {
        pairs = Py_NewRef(Py_None);
    }
    return Py_BuildValue("nnN", count, freed, pairs);
}

static PyObject *
base_clear_method(Core *c, PyObject *Py_UNUSED(ignored))
{
    Evicted ev;
    evicted_init(&ev);
    int rc = core_take_all(c, &ev);
    rc = core_finish(c, rc, 1, NULL, &ev, 0);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
base_items(Core *c, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        return NULL;
    }
    /* PyTuple_Pack and PyList_Append allocate but run no Python code: the list cannot change. */
    for (Node *n = c->root.next; n != &c->root; n = n->next) {
        PyObject *pair = PyTuple_Pack(2, n->key, n->value);
        if (pair == NULL || PyList_Append(list, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(pair);
    }
    return list;
}

static PyObject *
base_len(Core *c, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(PyDict_GET_SIZE(c->dict));
}

static PyObject *
base_reset_stats(Core *c, PyObject *Py_UNUSED(ignored))
{
    c->hits = 0;
    c->misses = 0;
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
    {NULL, NULL, 0, NULL},
};

static PyMemberDef base_members[] = {
    {"_total", T_PYSSIZET, offsetof(Core, total), READONLY, "Sum of the entries' sizes."},
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
    .tp_doc = "Entries with sizes in a dict and an LRU list; the machinery both front ends share.",
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

static PyObject *
core_subscript(Core *c, PyObject *key)
{
    Node *n = (Node *)PyDict_GetItemWithError(c->dict, key);
    if (n != NULL) {
        move_mru(c, n);
        c->hits++;
        return Py_NewRef(n->value);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    c->misses++;
    return PyObject_CallMethodOneArg((PyObject *)c, str_missing, key);
}

/* Take node n (found in the dict) out; returns 0 or -1, and runs the end-of-operation hooks. */
static int
core_remove_node(Core *c, Node *n)
{
    Evicted ev;
    evicted_init(&ev);
    int rc = core_detach(c, n);
    if (rc == 0 && evicted_push(&ev, n) < 0) {
        Py_DECREF(n);
        rc = -1;
    }
    return core_finish(c, rc, 1, NULL, &ev, 0);
}

static int
core_delete(Core *c, PyObject *key)
{
    Node *n = (Node *)PyDict_GetItemWithError(c->dict, key);
    if (n == NULL) {
        if (!PyErr_Occurred()) {
            make_key_error(key);
        }
        return -1;
    }
    return core_remove_node(c, n);
}

static int
core_set(Core *c, PyObject *key, PyObject *value)
{
    if (c->closed) {
        PyErr_Format(closed_error, "%s is closed", short_name((PyObject *)c));
        return -1;
    }
    Py_ssize_t size = core_sizeof(c, value);
    if (size < 0) {
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
    Evicted ev;
    evicted_init(&ev);
    PyObject *old = NULL;
    int rc = core_store(c, key, hash, value, size, 1, &old, &ev);
    return core_finish(c, rc, 1, old, &ev, 1);
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
    return PyDict_GET_SIZE(c->dict);
}

static int
core_contains(Core *c, PyObject *key)
{
    return PyDict_Contains(c->dict, key);
}

static PyObject *
core_iter(Core *c)
{
    PyObject *keys = PyList_New(0);
    if (keys == NULL) {
        return NULL;
    }
    for (Node *n = c->root.next; n != &c->root; n = n->next) {
        if (PyList_Append(keys, n->key) < 0) {
            Py_DECREF(keys);
            return NULL;
        }
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
    Node *n = (Node *)PyDict_GetItemWithError(c->dict, key);
    if (n != NULL) {
        move_mru(c, n);
        c->hits++;
        return Py_NewRef(n->value);
    }
    if (PyErr_Occurred()) {
        return NULL;
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
    Node *n = (Node *)PyDict_GetItemWithError(c->dict, key);
    if (n != NULL) {
        return Py_NewRef(n->value);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    return Py_NewRef(dflt);
}

static PyObject *
core_pop(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key, *dflt = NULL;
    if (parse_key_default("pop", args, nargs, kwnames, &key, &dflt) < 0) {
        return NULL;
    }
    Node *n = (Node *)PyDict_GetItemWithError(c->dict, key);
    if (n == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        if (dflt != NULL) {
            return Py_NewRef(dflt);
        }
        return make_key_error(key);
    }
    PyObject *value = Py_NewRef(n->value);
    if (core_remove_node(c, n) < 0) {
        Py_DECREF(value);
        return NULL;
    }
    return value;
}

static PyObject *
core_popitem(Core *c, PyObject *Py_UNUSED(ignored))
{
    Node *n = c->root.next;
    if (n == &c->root) {
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
    PyObject *pair = PyTuple_Pack(2, n->key, n->value);
    if (pair == NULL) {
        return NULL;
    }
    if (core_remove_node(c, n) < 0) {
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
    Node *n = (Node *)PyDict_GetItemWithError(c->dict, key);
    if (n != NULL) {
        move_mru(c, n);
        return Py_NewRef(n->value);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (core_set(c, key, dflt) < 0) {
        return NULL;
    }
    return Py_NewRef(dflt);
}

static PyObject *
core_missing(Core *c, PyObject *key)
{
    (void)c;
    return make_key_error(key);
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
    Node *n = dict_lookup(c, key, hash);
    if (n != NULL) {
        move_mru(c, n);
        c->hits++;
        Py_DECREF(key);
        return Py_NewRef(n->value);
    }
    if (PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    }
    c->misses++;
    PyObject *result = PyObject_Call(self->func, args, kwds);
    if (result == NULL || c->closed) {
        Py_DECREF(key);
        return result;
    }
    Py_ssize_t size = core_sizeof(c, result);
    if (size < 0) {
        Py_DECREF(key);
        Py_DECREF(result);
        return NULL;
    }
    /* The call may have stored the same key (recursion, another thread): as functools does,
       keep that entry and return this result. */
    Evicted ev;
    evicted_init(&ev);
    PyObject *old = NULL;
    int rc = core_store(c, key, hash, result, size, 0, &old, &ev);
    rc = core_finish(c, rc, 1, old, &ev, 1);
    Py_DECREF(key);
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
    PyObject_GC_UnTrack(self);
    func_clear(self);
    Py_CLEAR(self->core.dict);
    Py_TYPE(self)->tp_free((PyObject *)self);
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
    if (PyType_Ready(&NodeType) < 0 || PyType_Ready(&BaseType) < 0 ||
        PyType_Ready(&CoreType) < 0 || PyType_Ready(&FuncType) < 0) {
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
    if (kwd_mark == NULL || str_missing == NULL || str_sync == NULL || str_evicted == NULL) {
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
