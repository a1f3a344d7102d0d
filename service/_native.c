/*
 * Native loops for the per-block and per-token hot paths (docs/performance.md, "Native
 * loops"): query and event keys, index reads and writes, token ids in events and bodies.
 *
 * Each function does exactly what its Python twin does (service/index/loops.py, msgspec or
 * pydantic for the token readers), and the tests compare the two (tests/unit/test_native.py,
 * tests/unit/api/test_plain_query.py). The service runs without this module (the build is
 * optional: it needs a C compiler and xxhash.h, Debian's libxxhash-dev).
 *
 *   chain_keys(data, step, seed) -> list[int]
 *       Chained xxh3-64 over consecutive `step`-byte pieces of `data`, each seeded with
 *       the previous piece's digest (the first with `seed`); a trailing partial piece is
 *       ignored. Equals the loop over xxhash.xxh3_64_intdigest in TokenKeys.block_keys.
 *
 *   lookup_values(by_route, mask, keys) -> list[int]
 *       [by_route[key & mask].get(key, 0) for key in keys], as MemoryIndex.lookup reads
 *       the packed holder fields of a prompt's blocks.
 *
 *   summarize(values, slots) -> list[(match_length, blocks_held, prefix_tier_sets)]
 *       Per slot, one pass over a prompt's packed holder values (loops.py, py_summarize).
 *
 *   store_fields(by_route, mask, keys, shift, tier_bit, gen_bits) -> (added, to_log)
 *       MemoryIndex's store of blocks into one slot's 8-bit field at bit `shift` of each
 *       key's packed value (see loops.py, py_store_fields, for the rules).
 *
 *   unpack_tokens(raw) -> bytes
 *       A msgpack value that is nil or an array of ints in [0, 2**32), as packed native
 *       uint32 (empty for nil or no bytes), without a Python int per token; ValueError for
 *       anything else. What vllm.py's typed decoder accepts for BlockStored.token_ids.
 *
 *   unpack_json_tokens(raw) -> bytes
 *       The same for a JSON array of integers in [0, 2**32) written plainly (digits, no
 *       sign, fraction or exponent: what strict validation accepts as ints in range);
 *       ValueError for anything else, which the REST API then validates the slow way.
 *
 *   set_routed(by_route, limits, mask, keys, values) -> list[int]
 *       by_route[k & mask][k] = v for each pair; returns the routing values whose dict
 *       then holds more than its limit (repeats possible), for the caller to trim.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

static PyObject *zero;

static PyObject *
chain_keys(PyObject *module, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t step;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "y*nK:chain_keys", &data, &step, &seed)) {
        return NULL;
    }
    if (step <= 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "step must be positive");
        return NULL;
    }
    Py_ssize_t count = data.len / step;
    PyObject *keys = PyList_New(count);
    if (keys == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    const char *bytes = (const char *)data.buf;
    XXH64_hash_t key = (XXH64_hash_t)seed;
    for (Py_ssize_t i = 0; i < count; i++) {
        key = XXH3_64bits_withSeed(bytes + i * step, (size_t)step, key);
        PyObject *item = PyLong_FromUnsignedLongLong(key);
        if (item == NULL) {
            Py_DECREF(keys);
            PyBuffer_Release(&data);
            return NULL;
        }
        PyList_SET_ITEM(keys, i, item);
    }
    PyBuffer_Release(&data);
    return keys;
}

/* Argument checks shared by the index loops. Keys are copied into a tuple and each routed
 * dict is held by a strong reference while in use: comparing or replacing dict entries may
 * run arbitrary Python code (a key's __eq__, a value's __del__), which must not be able to
 * free what the loop is reading. */
static int
check_mask(PyObject *list, Py_ssize_t mask, const char *name)
{
    if (mask < 0 || mask >= PyList_GET_SIZE(list)) {
        PyErr_Format(PyExc_ValueError, "mask selects past the end of %s", name);
        return -1;
    }
    return 0;
}

/* by_route[key & mask], a new reference; NULL with an exception when it is not a dict or
 * the list shrank meanwhile. */
static PyObject *
bucket_of(PyObject *by_route, Py_ssize_t mask, PyObject *key, Py_ssize_t *route_out)
{
    if (!PyLong_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "keys must be ints");
        return NULL;
    }
    /* A key's low bits route it; negative or wide ints route by their low bits too. */
    Py_ssize_t route = (Py_ssize_t)(PyLong_AsUnsignedLongLongMask(key) & (unsigned long long)mask);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (route >= PyList_GET_SIZE(by_route)) {
        PyErr_SetString(PyExc_IndexError, "by_route shrank");
        return NULL;
    }
    PyObject *bucket = PyList_GET_ITEM(by_route, route);
    if (!PyDict_Check(bucket)) {
        PyErr_SetString(PyExc_TypeError, "by_route must hold dicts");
        return NULL;
    }
    if (route_out != NULL) {
        *route_out = route;
    }
    return Py_NewRef(bucket);
}

static PyObject *
lookup_values(PyObject *module, PyObject *args)
{
    PyObject *by_route, *keys_arg;
    Py_ssize_t mask;
    if (!PyArg_ParseTuple(args, "O!nO:lookup_values", &PyList_Type, &by_route, &mask,
                          &keys_arg)) {
        return NULL;
    }
    if (check_mask(by_route, mask, "by_route") < 0) {
        return NULL;
    }
    PyObject *keys = PySequence_Tuple(keys_arg);
    if (keys == NULL) {
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(keys);
    PyObject *values = PyList_New(count);
    if (values == NULL) {
        Py_DECREF(keys);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        PyObject *bucket = bucket_of(by_route, mask, key, NULL);
        if (bucket == NULL) {
            goto fail;
        }
        PyObject *value = PyDict_GetItemWithError(bucket, key);
        if (value == NULL && PyErr_Occurred()) {
            Py_DECREF(bucket);
            goto fail;
        }
        PyList_SET_ITEM(values, i, Py_NewRef(value != NULL ? value : zero));
        Py_DECREF(bucket);
    }
    Py_DECREF(keys);
    return values;
fail:
    Py_DECREF(values);
    Py_DECREF(keys);
    return NULL;
}

/* Bits of one slot's field (service/index/memory.py). */
#define FIELD 0xFFu
#define HELD 0x01u
#define TIERS 0x0Eu
#define GEN_SHIFT 4

/* The 8-bit field at `shift` of a packed value (a non-negative int of any size). */
static int
read_field(PyObject *value, Py_ssize_t shift, PyObject *shift_obj, unsigned *field)
{
    if (shift <= 56) {
        unsigned long long low = PyLong_AsUnsignedLongLongMask(value);
        if (low == (unsigned long long)-1 && PyErr_Occurred()) {
            return -1;
        }
        *field = (unsigned)((low >> shift) & FIELD);
        return 0;
    }
    PyObject *shifted = PyNumber_Rshift(value, shift_obj);
    if (shifted == NULL) {
        return -1;
    }
    unsigned long long low = PyLong_AsUnsignedLongLongMask(shifted);
    Py_DECREF(shifted);
    if (low == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    *field = (unsigned)(low & FIELD);
    return 0;
}

/* `bits << shift` as an int. */
static PyObject *
shifted_int(unsigned bits, Py_ssize_t shift, PyObject *shift_obj)
{
    if (shift <= 56) {
        return PyLong_FromUnsignedLongLong((unsigned long long)bits << shift);
    }
    PyObject *small = PyLong_FromUnsignedLong(bits);
    if (small == NULL) {
        return NULL;
    }
    PyObject *result = PyNumber_Lshift(small, shift_obj);
    Py_DECREF(small);
    return result;
}

static PyObject *
store_fields(PyObject *module, PyObject *args)
{
    PyObject *by_route, *keys_arg;
    Py_ssize_t mask, shift, tier_bit, gen_bits;
    if (!PyArg_ParseTuple(args, "O!nOnnn:store_fields", &PyList_Type, &by_route, &mask,
                          &keys_arg, &shift, &tier_bit, &gen_bits)) {
        return NULL;
    }
    if (check_mask(by_route, mask, "by_route") < 0) {
        return NULL;
    }
    if (shift < 0 || tier_bit < 0 || gen_bits < 0 || (tier_bit & ~(Py_ssize_t)TIERS) ||
        (gen_bits & ~(Py_ssize_t)(FIELD ^ (HELD | TIERS)))) {
        PyErr_SetString(PyExc_ValueError, "bad shift, tier bit or generation bits");
        return NULL;
    }
    PyObject *keys = PySequence_Tuple(keys_arg);
    if (keys == NULL) {
        return NULL;
    }
    PyObject *shift_obj = NULL, *fresh = NULL, *to_log = NULL;
    PyObject *bucket = NULL, *value = NULL;
    Py_ssize_t added = 0;
    if ((shift_obj = PyLong_FromSsize_t(shift)) == NULL ||
        (fresh = shifted_int(HELD | (unsigned)tier_bit | (unsigned)gen_bits, shift, shift_obj)) ==
            NULL ||
        (to_log = PyList_New(0)) == NULL) {
        goto fail;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        if ((bucket = bucket_of(by_route, mask, key, NULL)) == NULL) {
            goto fail;
        }
        value = PyDict_GetItemWithError(bucket, key);
        if (value == NULL && PyErr_Occurred()) {
            goto fail;
        }
        Py_XINCREF(value);
        unsigned old = 0;
        if (value != NULL && read_field(value, shift, shift_obj, &old) < 0) {
            goto fail;
        }
        PyObject *updated;
        int log_it;
        if (!(old & HELD)) {
            updated = value == NULL ? Py_NewRef(fresh) : PyNumber_Or(value, fresh);
            added++;
            log_it = 1;
        }
        else {
            unsigned new = (old & TIERS) | (unsigned)tier_bit | HELD | (unsigned)gen_bits;
            if (new == old) {
                Py_CLEAR(value);
                Py_CLEAR(bucket);
                continue;
            }
            PyObject *delta = shifted_int(old ^ new, shift, shift_obj);
            updated = delta == NULL ? NULL : PyNumber_Xor(value, delta);
            Py_XDECREF(delta);
            log_it = ((old ^ new) >> GEN_SHIFT) != 0;
        }
        Py_CLEAR(value);
        if (updated == NULL) {
            goto fail;
        }
        int failed = PyDict_SetItem(bucket, key, updated);
        Py_DECREF(updated);
        Py_CLEAR(bucket);
        if (failed < 0 || (log_it && PyList_Append(to_log, key) < 0)) {
            goto fail;
        }
    }
    Py_DECREF(keys);
    Py_DECREF(shift_obj);
    Py_DECREF(fresh);
    return Py_BuildValue("(nN)", added, to_log);
fail:
    Py_XDECREF(value);
    Py_XDECREF(bucket);
    Py_DECREF(keys);
    Py_XDECREF(shift_obj);
    Py_XDECREF(fresh);
    Py_XDECREF(to_log);
    return NULL;
}

static PyObject *
set_routed(PyObject *module, PyObject *args)
{
    PyObject *by_route, *limits, *keys_arg, *values_arg;
    Py_ssize_t mask;
    if (!PyArg_ParseTuple(args, "O!O!nOO:set_routed", &PyList_Type, &by_route, &PyList_Type,
                          &limits, &mask, &keys_arg, &values_arg)) {
        return NULL;
    }
    if (check_mask(by_route, mask, "by_route") < 0 || check_mask(limits, mask, "limits") < 0) {
        return NULL;
    }
    PyObject *keys = PySequence_Tuple(keys_arg);
    if (keys == NULL) {
        return NULL;
    }
    PyObject *values = PySequence_Tuple(values_arg);
    if (values == NULL) {
        Py_DECREF(keys);
        return NULL;
    }
    PyObject *over = NULL, *bucket = NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(keys);
    if (PyTuple_GET_SIZE(values) != count) {
        PyErr_SetString(PyExc_ValueError, "keys and values differ in length");
        goto fail;
    }
    if ((over = PyList_New(0)) == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        Py_ssize_t route;
        if ((bucket = bucket_of(by_route, mask, key, &route)) == NULL ||
            PyDict_SetItem(bucket, key, PyTuple_GET_ITEM(values, i)) < 0) {
            goto fail;
        }
        if (route >= PyList_GET_SIZE(limits)) {
            PyErr_SetString(PyExc_IndexError, "limits shrank");
            goto fail;
        }
        Py_ssize_t limit = PyLong_AsSsize_t(PyList_GET_ITEM(limits, route));
        if (limit == -1 && PyErr_Occurred()) {
            goto fail;
        }
        if (PyDict_GET_SIZE(bucket) > limit) {
            PyObject *route_obj = PyLong_FromSsize_t(route);
            if (route_obj == NULL) {
                goto fail;
            }
            int failed = PyList_Append(over, route_obj);
            Py_DECREF(route_obj);
            if (failed < 0) {
                goto fail;
            }
        }
        Py_CLEAR(bucket);
    }
    Py_DECREF(keys);
    Py_DECREF(values);
    return over;
fail:
    Py_XDECREF(bucket);
    Py_DECREF(keys);
    Py_DECREF(values);
    Py_XDECREF(over);
    return NULL;
}

/* The bytes of a non-negative int, least significant first, zero-padded to `size`; -1 with
 * an exception when it is negative, not an int, or wider than `size` bytes. Byte i is the
 * field of slot i. */
static int
value_bytes(PyObject *value, unsigned char *buffer, size_t size)
{
    if (!PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "values must be ints");
        return -1;
    }
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t needed = PyLong_AsNativeBytes(
        value, buffer, (Py_ssize_t)size,
        Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER |
            Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (needed < 0) {
        return -1;
    }
    if ((size_t)needed > size) {
        PyErr_SetString(PyExc_OverflowError, "value wider than its slots");
        return -1;
    }
    return 0;
#else
    return _PyLong_AsByteArray((PyLongObject *)value, buffer, size, 1, 0);
#endif
}

static PyObject *
summarize(PyObject *module, PyObject *args)
{
    PyObject *values_arg, *slots_arg;
    if (!PyArg_ParseTuple(args, "OO:summarize", &values_arg, &slots_arg)) {
        return NULL;
    }
    PyObject *values = PySequence_Tuple(values_arg);
    if (values == NULL) {
        return NULL;
    }
    PyObject *slots_tuple = PySequence_Tuple(slots_arg);
    if (slots_tuple == NULL) {
        Py_DECREF(values);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t slot_count = PyTuple_GET_SIZE(slots_tuple);
    Py_ssize_t *slots = PyMem_Calloc((size_t)slot_count + 1, sizeof(Py_ssize_t));
    /* Per slot: match length, blocks held, still matching, leading blocks per tier set. */
    Py_ssize_t *lengths = PyMem_Calloc((size_t)slot_count + 1, sizeof(Py_ssize_t));
    Py_ssize_t *held = PyMem_Calloc((size_t)slot_count + 1, sizeof(Py_ssize_t));
    char *matching = PyMem_Calloc((size_t)slot_count + 1, 1);
    Py_ssize_t(*tier_sets)[8] = PyMem_Calloc((size_t)slot_count + 1, sizeof(*tier_sets));
    unsigned char *fields = NULL;
    if (!slots || !lengths || !held || !matching || !tier_sets) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t width = 8; /* bytes read per value: past the highest slot asked about */
    for (Py_ssize_t j = 0; j < slot_count; j++) {
        slots[j] = PyLong_AsSsize_t(PyTuple_GET_ITEM(slots_tuple, j));
        if (slots[j] == -1 && PyErr_Occurred()) {
            goto done;
        }
        if (slots[j] < 0 || slots[j] > 1 << 20) {
            PyErr_SetString(PyExc_ValueError, "slot out of range");
            goto done;
        }
        if (slots[j] + 1 > width) {
            width = slots[j] + 1;
        }
        matching[j] = 1;
    }
    if ((fields = PyMem_Malloc((size_t)width)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(values);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = PyTuple_GET_ITEM(values, i);
        unsigned long long low;
        int wide = 0;
        if (PyLong_CheckExact(value)) {
            low = PyLong_AsUnsignedLongLong(value);
            if (low == (unsigned long long)-1 && PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                    goto done;
                }
                PyErr_Clear();
                wide = 1;
            }
        }
        else {
            wide = 1;
        }
        if (wide) {
            /* Fields past bit 64 (slot 8 and up), or an int subclass: read every byte. Bytes
             * past the highest slot asked about are ignored, so read the value's own width. */
            Py_ssize_t bits = PyLong_Check(value) ? (Py_ssize_t)_PyLong_NumBits(value) : -1;
            if (bits < 0) {
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_TypeError, "values must be ints");
                }
                goto done;
            }
            Py_ssize_t need = bits / 8 + 1;
            if (need > width) {
                unsigned char *grown = PyMem_Realloc(fields, (size_t)need);
                if (grown == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                fields = grown;
                width = need;
            }
            memset(fields, 0, (size_t)width);
            if (value_bytes(value, fields, (size_t)width) < 0) {
                goto done;
            }
        }
        for (Py_ssize_t j = 0; j < slot_count; j++) {
            unsigned field;
            if (!wide) {
                field = slots[j] < 8 ? (unsigned)((low >> (8 * slots[j])) & FIELD) : 0;
            }
            else {
                field = fields[slots[j]];
            }
            if (field & HELD) {
                held[j]++;
                if (matching[j]) {
                    lengths[j]++;
                    tier_sets[j][(field & TIERS) >> 1]++;
                }
            }
            else {
                matching[j] = 0;
            }
        }
    }
    if ((result = PyList_New(slot_count)) == NULL) {
        goto done;
    }
    for (Py_ssize_t j = 0; j < slot_count; j++) {
        PyObject *sets = PyDict_New();
        if (sets == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        for (int t = 0; t < 8; t++) {
            if (tier_sets[j][t] == 0) {
                continue;
            }
            PyObject *key = PyLong_FromLong(t), *number = PyLong_FromSsize_t(tier_sets[j][t]);
            int failed = key == NULL || number == NULL || PyDict_SetItem(sets, key, number) < 0;
            Py_XDECREF(key);
            Py_XDECREF(number);
            if (failed) {
                Py_DECREF(sets);
                Py_CLEAR(result);
                goto done;
            }
        }
        PyObject *entry = Py_BuildValue("(nnN)", lengths[j], held[j], sets);
        if (entry == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, j, entry);
    }
done:
    PyMem_Free(slots);
    PyMem_Free(lengths);
    PyMem_Free(held);
    PyMem_Free(matching);
    PyMem_Free(tier_sets);
    PyMem_Free(fields);
    Py_DECREF(values);
    Py_DECREF(slots_tuple);
    return result;
}

/* Big-endian reads of msgpack's fixed-width fields. */
static unsigned long long
read_be(const unsigned char *p, int width)
{
    unsigned long long value = 0;
    for (int i = 0; i < width; i++) {
        value = (value << 8) | p[i];
    }
    return value;
}

static PyObject *
unpack_tokens(PyObject *module, PyObject *args)
{
    Py_buffer raw;
    if (!PyArg_ParseTuple(args, "y*:unpack_tokens", &raw)) {
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)raw.buf;
    const unsigned char *end = p + raw.len;
    PyObject *result = NULL;
    unsigned long long count;
    if (raw.len == 0 || (*p == 0xc0 && raw.len == 1)) { /* absent or nil */
        result = PyBytes_FromStringAndSize(NULL, 0);
        goto done;
    }
    if (p < end && (*p & 0xf0) == 0x90) {
        count = *p & 0x0f;
        p += 1;
    }
    else if (p + 3 <= end && *p == 0xdc) {
        count = read_be(p + 1, 2);
        p += 3;
    }
    else if (p + 5 <= end && *p == 0xdd) {
        count = read_be(p + 1, 4);
        p += 5;
    }
    else {
        goto invalid;
    }
    /* Every element takes at least one byte: a count past the end is a lie. */
    if (count > (unsigned long long)(end - p)) {
        goto invalid;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * sizeof(uint32_t)));
    if (result == NULL) {
        goto done;
    }
    uint32_t *out = (uint32_t *)PyBytes_AS_STRING(result);
    for (unsigned long long i = 0; i < count; i++) {
        unsigned char tag = *p;
        long long value;
        int width;
        if (tag <= 0x7f) { /* positive fixint */
            out[i] = tag;
            p += 1;
            continue;
        }
        switch (tag) {
        case 0xcc: width = 1; break; /* uint 8..64 */
        case 0xcd: width = 2; break;
        case 0xce: width = 4; break;
        case 0xcf: width = 8; break;
        case 0xd0: width = -1; break; /* int 8..64 */
        case 0xd1: width = -2; break;
        case 0xd2: width = -4; break;
        case 0xd3: width = -8; break;
        default: goto invalid; /* negative fixint, float, bool, nil, str, ... */
        }
        int size = width < 0 ? -width : width;
        if (p + 1 + size > end) {
            goto invalid;
        }
        unsigned long long bits = read_be(p + 1, size);
        if (width > 0) {
            if (bits > 0xffffffffULL) {
                goto invalid;
            }
            out[i] = (uint32_t)bits;
        }
        else {
            int shift = 64 - 8 * size; /* sign-extend */
            value = (long long)(bits << shift) >> shift;
            if (value < 0 || value > 0xffffffffLL) {
                goto invalid;
            }
            out[i] = (uint32_t)value;
        }
        p += 1 + size;
    }
    if (p != end) {
        goto invalid;
    }
    goto done;
invalid:
    Py_CLEAR(result);
    PyErr_SetString(PyExc_ValueError, "token_ids is not nil or an array of ints in [0, 2**32)");
done:
    PyBuffer_Release(&raw);
    return result;
}

static int
json_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static PyObject *
unpack_json_tokens(PyObject *module, PyObject *args)
{
    Py_buffer raw;
    if (!PyArg_ParseTuple(args, "y*:unpack_json_tokens", &raw)) {
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)raw.buf;
    const unsigned char *end = p + raw.len;
    PyObject *result = NULL;
    /* At most one token per two bytes ("1,"): enough room without a first pass. */
    Py_ssize_t capacity = raw.len / 2 + 1, count = 0;
    uint32_t *out = PyMem_Malloc((size_t)capacity * sizeof(uint32_t));
    if (out == NULL) {
        PyBuffer_Release(&raw);
        return PyErr_NoMemory();
    }
    while (p < end && json_space(*p)) {
        p++;
    }
    if (p == end || *p++ != '[') {
        goto invalid;
    }
    while (p < end && json_space(*p)) {
        p++;
    }
    if (p < end && *p == ']') {
        p++;
    }
    else {
        for (;;) {
            if (p == end || *p < '0' || *p > '9') {
                goto invalid;
            }
            unsigned long long value = 0;
            const unsigned char *digits = p;
            while (p < end && *p >= '0' && *p <= '9') {
                value = value * 10 + (unsigned)(*p - '0');
                if (p - digits >= 10 || value > 0xffffffffULL) {
                    goto invalid;
                }
                p++;
            }
            if (*digits == '0' && p - digits > 1) {
                goto invalid; /* JSON has no leading zeros */
            }
            if (count == capacity) {
                goto invalid;
            }
            out[count++] = (uint32_t)value;
            while (p < end && json_space(*p)) {
                p++;
            }
            if (p < end && *p == ',') {
                p++;
                while (p < end && json_space(*p)) {
                    p++;
                }
                continue;
            }
            if (p < end && *p == ']') {
                p++;
                break;
            }
            goto invalid; /* a fraction, an exponent, another value, or the end */
        }
    }
    while (p < end && json_space(*p)) {
        p++;
    }
    if (p != end) {
        goto invalid;
    }
    result = PyBytes_FromStringAndSize((const char *)out, count * (Py_ssize_t)sizeof(uint32_t));
    goto done;
invalid:
    PyErr_SetString(PyExc_ValueError, "not a JSON array of plain integers in [0, 2**32)");
done:
    PyMem_Free(out);
    PyBuffer_Release(&raw);
    return result;
}

static PyMethodDef methods[] = {
    {"chain_keys", chain_keys, METH_VARARGS,
     "chain_keys(data, step, seed) -> list[int]: chained xxh3-64 over step-byte pieces."},
    {"lookup_values", lookup_values, METH_VARARGS,
     "lookup_values(by_route, mask, keys) -> list[int]: by_route[k & mask].get(k, 0)."},
    {"store_fields", store_fields, METH_VARARGS,
     "store_fields(by_route, mask, keys, shift, tier_bit, gen_bits) -> (added, to_log)."},
    {"summarize", summarize, METH_VARARGS,
     "summarize(values, slots) -> list[(match_length, blocks_held, prefix_tier_sets)]."},
    {"unpack_tokens", unpack_tokens, METH_VARARGS,
     "unpack_tokens(raw) -> bytes: a msgpack array of uint32 ints, packed native-endian."},
    {"unpack_json_tokens", unpack_json_tokens, METH_VARARGS,
     "unpack_json_tokens(raw) -> bytes: a JSON array of uint32 ints, packed native-endian."},
    {"set_routed", set_routed, METH_VARARGS,
     "set_routed(by_route, limits, mask, keys, values) -> list[int]: routes over limit."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_native", "Native loops: block keys, index reads and writes, token ids.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (zero == NULL && (zero = PyLong_FromLong(0)) == NULL) {
        return NULL;
    }
    return PyModule_Create(&module_def);
}
