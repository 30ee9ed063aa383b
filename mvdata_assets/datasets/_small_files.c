/*
 * First attempts at many small files of known size, in C: libcurl's multi interface, OpenSSL's sha256 / md5, the
 * `.part` written and its writeback started, all without the GIL.
 *
 * Why hand-written: per small file the downloader's Python loop (pycurl, a generator per file, the sink, the
 * committer's hand-offs) costs ~110 us of CPU where libcurl and the kernel need ~40 us, and on two cores that Python
 * was what bounded 2,000 x 64 KiB files at ~0.65x the time of `curl -Z` (bench/downloads.py). No library fetches,
 * hashes and writes a batch of files with the engine's checks: pycurl calls back into Python for every body block.
 * This does one thing: GET each file once (redirects followed, HTTP/1.1, keep-alive connections shared), gather its
 * body in memory, and, when a 200 brought exactly the expected bytes, hash them and write NAME.part. Everything else
 * (a retry, a resume, an error status, a mismatch) is only reported: the Python engine (fetch.py) decides and goes
 * on from there with its own attempts. The renames into place and the durability batch are Python's too.
 *
 * fetch(tasks, on_done, transfers, timeout_s, user_agent, cancel, claim=None)
 *   tasks: sequence of (url: str, part_path: str, size: int, limit: int, headers: tuple[str, ...], md5: bool), where
 *   a 200's body growing past `limit` bytes ends its transfer (TOO_BIG); one of another size than `size` is hashed
 *   but not written
 *   on_done(index, outcome) is called (with the GIL) as each task ends, in the order they end; outcome is
 *   (kind, http_status, curl_code, message, retry_after, received, sha256, md5, mtime_ns, seconds, partial, etag),
 *   where `partial` holds the bytes a 200 brought before it broke (kept for a resume) and `etag` its ETag
 *   cancel: a writable buffer of at least one byte; a non-zero first byte ends the call soon (CANCELLED outcomes).
 *   claim: a writable, 8-byte aligned buffer of at least 8 bytes holding the index of the next task to start (0 at
 *   first): threads calling fetch with the same tasks and the same claim share them out as they go, so that none
 *   idles while another still has files queued (split in fixed halves, one thread ended 10-30 ms after the other in
 *   a 0.17 s run of 2,000 files). Without it, this call takes every task itself.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if LIBCURL_VERSION_NUM < 0x075500
#error "libcurl 7.85 or newer is needed (CURLOPT_PROTOCOLS_STR, curl_easy_header)"
#endif

enum { COMPLETE = 0, REFUSED = 1, BROKEN = 2, TOO_BIG = 3, WRITE_FAILED = 4, CANCELLED = 5 };

#define BUFFER_BYTES (256 * 1024) /* libcurl's receive buffer, as the Python loop sets it */
#define MAX_REDIRECTS 10L
#define STALL_SCAN_S 0.2 /* how often transfers are checked for having stalled */

typedef struct {
    char *url, *path;
    long long size, limit; /* the expected size; a body growing past `limit` ends its transfer (TOO_BIG) */
    struct curl_slist *headers; /* shared among the tasks that passed the same headers object */
    int md5;
} Task;

typedef struct {
    CURL *handle;
    Py_ssize_t index; /* the task, or -1 when idle */
    char *body;
    long long received, capacity;
    int too_big;
    double started, last_seen;
} Transfer;

typedef struct {
    int kind, errno_value;
    long status;
    CURLcode code;
    char message[CURL_ERROR_SIZE + 64];
    char retry_after[64], etag[256];
    char *partial; /* the bytes a 200 brought before it broke (owned: freed once reported) */
    char sha256[65], md5[33];
    long long received, mtime_ns;
    double seconds;
} Outcome;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static size_t on_header(char *data, size_t size, size_t count, void *user) {
    ((Transfer *)user)->last_seen = now_s();
    return size * count;
}

/* The body of a 200 goes to memory, never past the task's limit (more ends the transfer); other answers' bodies are
 * read and dropped, so that their connection stays usable. */
static size_t on_body(char *data, size_t size, size_t count, void *user) {
    Transfer *transfer = user;
    Task *task = NULL;
    size_t bytes = size * count;
    long status = 0;
    transfer->last_seen = now_s();
    curl_easy_getinfo(transfer->handle, CURLINFO_RESPONSE_CODE, &status);
    if (status != 200) return bytes;
    curl_easy_getinfo(transfer->handle, CURLINFO_PRIVATE, (char **)&task);
    if (transfer->received + (long long)bytes > transfer->capacity) { /* bigger than expected: held up to the limit */
        char *body = transfer->received + (long long)bytes <= task->limit ? realloc(transfer->body, task->limit) : NULL;
        if (!body) {
            transfer->too_big = 1;
            return 0;
        }
        transfer->body = body;
        transfer->capacity = task->limit;
    }
    memcpy(transfer->body + transfer->received, data, bytes);
    transfer->received += bytes;
    return bytes;
}

static void hex(const unsigned char *digest, unsigned int length, char *out) {
    static const char digits[] = "0123456789abcdef";
    for (unsigned int i = 0; i < length; i++) {
        out[2 * i] = digits[digest[i] >> 4];
        out[2 * i + 1] = digits[digest[i] & 15];
    }
    out[2 * length] = '\0';
}

/* Creates the .part holding the body and starts its writeback (the committer's syncfs then finds little left); on
 * failure nothing is left of it. */
static int write_part(const Task *task, const Transfer *transfer, Outcome *outcome) {
    int fd = open(task->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        outcome->errno_value = errno;
        return -1;
    }
    long long done = 0;
    struct stat st;
    while (done < transfer->received) {
        ssize_t wrote = write(fd, transfer->body + done, transfer->received - done);
        if (wrote < 0 && errno == EINTR) continue;
        if (wrote <= 0) {
            if (wrote == 0) errno = ENOSPC;
            goto failed;
        }
        done += wrote;
    }
    sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    if (fstat(fd, &st) != 0) goto failed;
    int closed = close(fd);
    fd = -1;
    if (closed != 0) goto failed;
    outcome->mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    return 0;
failed:
    outcome->errno_value = errno;
    if (fd >= 0) close(fd);
    unlink(task->path);
    return -1;
}

static void finish(const Task *task, Transfer *transfer, CURLcode code, const char *error, Outcome *outcome) {
    memset(outcome, 0, sizeof *outcome);
    curl_easy_getinfo(transfer->handle, CURLINFO_RESPONSE_CODE, &outcome->status);
    outcome->code = code;
    outcome->received = transfer->received;
    struct curl_header *header;
    if (curl_easy_header(transfer->handle, "Retry-After", 0, CURLH_HEADER, -1, &header) == CURLHE_OK)
        snprintf(outcome->retry_after, sizeof outcome->retry_after, "%s", header->value);
    if (transfer->too_big) {
        outcome->kind = TOO_BIG;
    } else if (code != CURLE_OK) {
        outcome->kind = BROKEN;
        snprintf(outcome->message, sizeof outcome->message, "%s", error[0] ? error : curl_easy_strerror(code));
        if (outcome->status == 200 && transfer->received) { /* kept for a resume, with the validator it needs */
            outcome->partial = transfer->body;
            transfer->body = NULL;
            if (curl_easy_header(transfer->handle, "ETag", 0, CURLH_HEADER, -1, &header) == CURLHE_OK)
                snprintf(outcome->etag, sizeof outcome->etag, "%s", header->value);
        }
    } else if (outcome->status != 200) {
        outcome->kind = REFUSED;
    } else {
        outcome->kind = COMPLETE;
        unsigned char digest[EVP_MAX_MD_SIZE];
        unsigned int length;
        EVP_Digest(transfer->body, transfer->received, digest, &length, EVP_sha256(), NULL);
        hex(digest, length, outcome->sha256);
        if (task->md5) {
            EVP_Digest(transfer->body, transfer->received, digest, &length, EVP_md5(), NULL);
            hex(digest, length, outcome->md5);
        }
        /* a body of the wrong size fails its check in Python and is never written */
        if (transfer->received == task->size && write_part(task, transfer, outcome) != 0) outcome->kind = WRITE_FAILED;
    }
    outcome->seconds = now_s() - transfer->started;
    free(transfer->body);
    transfer->body = NULL;
    transfer->index = -1;
}

static PyObject *text_or_none(const char *text) {
    return text[0] ? PyUnicode_FromString(text) : Py_NewRef(Py_None);
}

static PyObject *outcome_tuple(const Outcome *o) {
    int write_failed = o->kind == WRITE_FAILED;
    PyObject *mtime = o->mtime_ns ? PyLong_FromLongLong(o->mtime_ns) : Py_NewRef(Py_None);
    PyObject *partial = o->partial ? PyBytes_FromStringAndSize(o->partial, o->received) : Py_NewRef(Py_None);
    return Py_BuildValue("(iliNNLNNNdNN)", o->kind, o->status, write_failed ? (long)o->errno_value : (long)o->code,
                         text_or_none(write_failed ? strerror(o->errno_value) : o->message),
                         text_or_none(o->retry_after), o->received, text_or_none(o->sha256), text_or_none(o->md5),
                         mtime, o->seconds, partial, text_or_none(o->etag));
}

/* Hands finished tasks to on_done, with the GIL; returns -1 (the Python error set) when it raised. */
static int report(PyObject *on_done, const Py_ssize_t *indexes, Outcome *outcomes, int count) {
    int failed = 0;
    for (int i = 0; i < count; i++) {
        PyObject *outcome = failed ? NULL : outcome_tuple(&outcomes[i]);
        free(outcomes[i].partial);
        outcomes[i].partial = NULL;
        if (!outcome) {
            failed = 1;
            continue;
        }
        PyObject *result = PyObject_CallFunction(on_done, "nN", indexes[i], outcome);
        failed = !result;
        Py_XDECREF(result);
    }
    return failed ? -1 : 0;
}

static CURL *new_handle(long timeout_s, const char *user_agent) {
    CURL *handle = curl_easy_init();
    if (!handle) return NULL;
    curl_easy_setopt(handle, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(handle, CURLOPT_USERAGENT, user_agent);
    curl_easy_setopt(handle, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(handle, CURLOPT_MAXREDIRS, MAX_REDIRECTS);
    curl_easy_setopt(handle, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(handle, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(handle, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(handle, CURLOPT_BUFFERSIZE, (long)BUFFER_BYTES);
    curl_easy_setopt(handle, CURLOPT_CONNECTTIMEOUT, timeout_s);
    curl_easy_setopt(handle, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(handle, CURLOPT_WRITEFUNCTION, on_body);
    return handle;
}

static int start(CURLM *multi, Transfer *transfer, Task *tasks, Py_ssize_t index, char *error) {
    Task *task = &tasks[index];
    transfer->capacity = task->size;
    transfer->body = malloc(task->size ? task->size : 1);
    if (!transfer->body) return -1;
    transfer->index = index;
    transfer->received = 0;
    transfer->too_big = 0;
    transfer->started = transfer->last_seen = now_s();
    error[0] = '\0';
    curl_easy_setopt(transfer->handle, CURLOPT_URL, task->url);
    curl_easy_setopt(transfer->handle, CURLOPT_HTTPHEADER, task->headers);
    curl_easy_setopt(transfer->handle, CURLOPT_PRIVATE, (char *)task);
    curl_easy_setopt(transfer->handle, CURLOPT_HEADERDATA, transfer);
    curl_easy_setopt(transfer->handle, CURLOPT_WRITEDATA, transfer);
    curl_easy_setopt(transfer->handle, CURLOPT_ERRORBUFFER, error);
    curl_multi_add_handle(multi, transfer->handle);
    return 0;
}

static void free_tasks(Task *tasks, Py_ssize_t count, struct curl_slist **lists, Py_ssize_t list_count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        free(tasks[i].url);
        free(tasks[i].path);
    }
    for (Py_ssize_t i = 0; i < list_count; i++) curl_slist_free_all(lists[i]);
    PyMem_Free(tasks);
    PyMem_Free(lists);
}

/* Copies the tasks out of Python objects, so that the transfers run without the GIL. Tasks passing the same headers
 * object share one curl_slist. */
static Task *read_tasks(PyObject *sequence, Py_ssize_t *count, struct curl_slist ***lists, Py_ssize_t *list_count) {
    PyObject *fast = PySequence_Fast(sequence, "tasks must be a sequence");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    Task *tasks = PyMem_Calloc(n ? n : 1, sizeof(Task));
    PyObject **header_objects = PyMem_Calloc(n ? n : 1, sizeof(PyObject *));
    *lists = PyMem_Calloc(n ? n : 1, sizeof(struct curl_slist *));
    *list_count = 0;
    *count = 0;
    if (!tasks || !header_objects || !*lists) {
        PyErr_NoMemory();
        goto failed;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *url, *path_object, *headers, *path_bytes = NULL;
        long long size, limit;
        int md5;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i),
                              "UOLLOp;a task is (url, part_path, size, limit, headers, md5)", &url, &path_object, &size,
                              &limit, &headers, &md5))
            goto failed;
        if (size < 0 || limit < size || limit > (1LL << 31)) {
            PyErr_Format(PyExc_ValueError, "task %zd: size %lld and limit %lld are not a small file's", i, size, limit);
            goto failed;
        }
        if (!PyUnicode_FSConverter(path_object, &path_bytes)) goto failed;
        const char *url_text = PyUnicode_AsUTF8(url);
        if (!url_text) {
            Py_DECREF(path_bytes);
            goto failed;
        }
        tasks[i].url = strdup(url_text);
        tasks[i].path = strdup(PyBytes_AS_STRING(path_bytes));
        Py_DECREF(path_bytes);
        tasks[i].size = size;
        tasks[i].limit = limit;
        tasks[i].md5 = md5;
        *count = i + 1;
        if (!tasks[i].url || !tasks[i].path) {
            PyErr_NoMemory();
            goto failed;
        }
        Py_ssize_t known = 0;
        while (known < *list_count && header_objects[known] != headers) known++;
        if (known == *list_count) {
            PyObject *lines = PySequence_Fast(headers, "a task's headers must be a sequence of strings");
            if (!lines) goto failed;
            struct curl_slist *list = NULL;
            for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(lines); j++) {
                PyObject *item = PySequence_Fast_GET_ITEM(lines, j);
                if (!PyUnicode_Check(item))
                    PyErr_Format(PyExc_TypeError, "task %zd: header %zd is %.50s, not a string", i, j,
                                 Py_TYPE(item)->tp_name);
                const char *line = PyErr_Occurred() ? NULL : PyUnicode_AsUTF8(item);
                struct curl_slist *longer = line ? curl_slist_append(list, line) : NULL;
                if (!longer) {
                    Py_DECREF(lines);
                    curl_slist_free_all(list);
                    if (!PyErr_Occurred()) PyErr_NoMemory();
                    goto failed;
                }
                list = longer;
            }
            Py_DECREF(lines);
            header_objects[known] = headers;
            (*lists)[known] = list;
            (*list_count)++;
        }
        tasks[i].headers = (*lists)[known];
    }
    PyMem_Free(header_objects);
    Py_DECREF(fast);
    return tasks;
failed:
    free_tasks(tasks, *count, *lists, *list_count);
    PyMem_Free(header_objects);
    Py_DECREF(fast);
    return NULL;
}

/* The index of the next task this call starts: from the buffer shared with other threads, or its own count. */
static Py_ssize_t claim_next(long long *shared, long long *own) {
    return (Py_ssize_t)(shared ? __atomic_fetch_add(shared, 1, __ATOMIC_RELAXED) : (*own)++);
}

static PyObject *fetch(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"tasks", "on_done", "transfers", "timeout_s", "user_agent", "cancel", "claim", NULL};
    PyObject *task_objects, *on_done;
    int transfer_count;
    double timeout_s;
    const char *user_agent;
    Py_buffer cancel, claim = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOidsw*|w*", keywords, &task_objects, &on_done, &transfer_count,
                                     &timeout_s, &user_agent, &cancel, &claim))
        return NULL;
    const char *wrong = cancel.len < 1 || transfer_count < 1 || timeout_s <= 0
                            ? "need a cancel buffer, transfers >= 1 and timeout_s > 0"
                        : claim.buf && (claim.len < 8 || (uintptr_t)claim.buf % 8)
                            ? "claim must be a buffer of at least 8 bytes, 8-byte aligned"
                            : NULL;
    if (wrong) {
        PyBuffer_Release(&cancel);
        if (claim.buf) PyBuffer_Release(&claim);
        return PyErr_Format(PyExc_ValueError, "%s", wrong);
    }
    volatile char *cancelled = cancel.buf;
    long long *shared_claim = claim.buf, own_claim = 0;
    Py_ssize_t count, list_count;
    struct curl_slist **lists;
    Task *tasks = read_tasks(task_objects, &count, &lists, &list_count);
    if (!tasks) {
        PyBuffer_Release(&cancel);
        if (claim.buf) PyBuffer_Release(&claim);
        return NULL;
    }
    if (transfer_count > count) transfer_count = count ? (int)count : 1;
    CURLM *multi = curl_multi_init();
    Transfer *transfers = PyMem_Calloc(transfer_count, sizeof(Transfer));
    char (*errors)[CURL_ERROR_SIZE] = PyMem_Calloc(transfer_count, CURL_ERROR_SIZE);
    Py_ssize_t *indexes = PyMem_Calloc(transfer_count + 1, sizeof(Py_ssize_t));
    Outcome *outcomes = PyMem_Calloc(transfer_count + 1, sizeof(Outcome));
    int failed = !multi || !transfers || !errors || !indexes || !outcomes;
    for (int i = 0; !failed && i < transfer_count; i++) {
        transfers[i].index = -1;
        transfers[i].handle = new_handle((long)(timeout_s + 0.999), user_agent);
        failed = !transfers[i].handle;
    }
    if (failed) PyErr_NoMemory();

    int more = 1, running = 0; /* more: tasks may be left to claim */
    double next_scan = now_s() + STALL_SCAN_S;
    PyThreadState *thread = PyEval_SaveThread();
    while (!failed && (more || running)) {
        int stopping = *cancelled != 0, ended = 0;
        for (int i = 0; i < transfer_count && more && !stopping; i++) {
            if (transfers[i].index >= 0) continue;
            Py_ssize_t next = claim_next(shared_claim, &own_claim);
            if (next >= count) {
                more = 0;
                break;
            }
            if (start(multi, &transfers[i], tasks, next, errors[i]) != 0) {
                failed = 1;
                break;
            }
            running++;
        }
        int active;
        curl_multi_perform(multi, &active);
        CURLMsg *message;
        int left;
        while ((message = curl_multi_info_read(multi, &left))) {
            if (message->msg != CURLMSG_DONE) continue;
            for (int i = 0; i < transfer_count; i++) {
                if (transfers[i].handle != message->easy_handle) continue;
                CURLcode code = message->data.result;
                curl_multi_remove_handle(multi, transfers[i].handle);
                indexes[ended] = transfers[i].index;
                finish(&tasks[transfers[i].index], &transfers[i], code, errors[i], &outcomes[ended]);
                running--;
                ended++;
                break;
            }
            if (ended == transfer_count) break;
        }
        double now = now_s();
        if (stopping || now >= next_scan) { /* stalled transfers end as timed out; all of them when cancelled */
            next_scan = now + STALL_SCAN_S;
            for (int i = 0; i < transfer_count && ended < transfer_count; i++) {
                if (transfers[i].index < 0 || (!stopping && now - transfers[i].last_seen < timeout_s)) continue;
                curl_multi_remove_handle(multi, transfers[i].handle);
                snprintf(errors[i], CURL_ERROR_SIZE, "timed out (no data for %g s)", timeout_s);
                indexes[ended] = transfers[i].index;
                finish(&tasks[transfers[i].index], &transfers[i], CURLE_OPERATION_TIMEDOUT, errors[i], &outcomes[ended]);
                if (stopping) outcomes[ended].kind = CANCELLED;
                running--;
                ended++;
            }
        }
        if (ended) {
            PyEval_RestoreThread(thread);
            failed = report(on_done, indexes, outcomes, ended) != 0;
            thread = PyEval_SaveThread();
            if (failed) break;
        }
        if (stopping && !running) break; /* the tasks not started are left out: the caller knows it cancelled */
        if (running && !ended) curl_multi_poll(multi, NULL, 0, (int)(STALL_SCAN_S * 1000), NULL);
    }
    for (int i = 0; transfers && i < transfer_count; i++) { /* after an error in on_done: the rest is dropped */
        if (!transfers[i].handle) continue;
        if (transfers[i].index >= 0) curl_multi_remove_handle(multi, transfers[i].handle);
        free(transfers[i].body);
        curl_easy_cleanup(transfers[i].handle);
    }
    if (multi) curl_multi_cleanup(multi);
    PyEval_RestoreThread(thread);
    PyMem_Free(transfers);
    PyMem_Free(errors);
    PyMem_Free(indexes);
    PyMem_Free(outcomes);
    free_tasks(tasks, count, lists, list_count);
    PyBuffer_Release(&cancel);
    if (claim.buf) PyBuffer_Release(&claim);
    if (failed) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fetch", (PyCFunction)(void (*)(void))fetch, METH_VARARGS | METH_KEYWORDS,
     "fetch(tasks, on_done, transfers, timeout_s, user_agent, cancel, claim=None): first attempts at small files (see "
     "the source)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_small_files", NULL, -1, methods};

PyMODINIT_FUNC PyInit__small_files(void) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        PyErr_SetString(PyExc_ImportError, "libcurl's global initialisation failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "COMPLETE", COMPLETE) || PyModule_AddIntConstant(m, "REFUSED", REFUSED) ||
        PyModule_AddIntConstant(m, "BROKEN", BROKEN) || PyModule_AddIntConstant(m, "TOO_BIG", TOO_BIG) ||
        PyModule_AddIntConstant(m, "WRITE_FAILED", WRITE_FAILED) || PyModule_AddIntConstant(m, "CANCELLED", CANCELLED)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
