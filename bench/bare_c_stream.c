/* A baseline for bench/downloads.py, not part of the package: the least a C program does for the engine's guarantees
 * on one big file, to show what the big-file target asks of any engine on this machine.
 *
 * One HTTP/1.1 stream (libcurl), its body written to OUT.part in 64 KiB pieces as it arrives, with writeback started
 * every 8 MiB (sync_file_range) so that the final fsync finds little left; a second thread hashes (OpenSSL sha256) the
 * same bytes from a ring of 1 MiB buffers while the next ones arrive, so the digest costs a core but not time; at the
 * end the size and sha256 are checked, then fsync, the rename from .part and an fsync of the folder.
 * No resume, retry, redirect rules, progress or records.
 *
 * Usage: bare_c_stream URL OUT SIZE SHA256
 * Build: gcc -O2 -pthread -o bare_c_stream bare_c_stream.c -lcurl -lcrypto  (libcurl4-openssl-dev libssl-dev)
 */
#define _GNU_SOURCE
#include <curl/curl.h>
#include <fcntl.h>
#include <libgen.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BUFFER_BYTES (1 << 20)
#define RING 8
#define PIECE_BYTES (64 * 1024)
#define WRITEBACK_EVERY (8 << 20)

typedef struct {
    char *data[RING];
    size_t filled[RING];
    int head, tail, done; /* buffers head..tail-1 are full and waiting for the hasher */
    pthread_mutex_t lock;
    pthread_cond_t changed;
    EVP_MD_CTX *sha256;
    int fd;
    long long written, started_writeback;
    int failed;
} Stream;

static void hand_over(Stream *s) { /* the current buffer is full (or the body ended): the hasher takes it */
    pthread_mutex_lock(&s->lock);
    s->tail++;
    pthread_cond_broadcast(&s->changed);
    while (s->tail - s->head >= RING) pthread_cond_wait(&s->changed, &s->lock); /* the hasher is a ring behind */
    s->filled[s->tail % RING] = 0;
    pthread_mutex_unlock(&s->lock);
}

static size_t on_body(char *bytes, size_t size, size_t count, void *user) {
    Stream *s = user;
    size_t left = size * count, at = 0;
    while (left) {
        int slot = s->tail % RING;
        size_t room = BUFFER_BYTES - s->filled[slot], take = left < room ? left : room;
        memcpy(s->data[slot] + s->filled[slot], bytes + at, take);
        s->filled[slot] += take;
        at += take;
        left -= take;
        if (s->filled[slot] == BUFFER_BYTES) {
            for (size_t off = 0; off < BUFFER_BYTES; off += PIECE_BYTES)
                if (pwrite(s->fd, s->data[slot] + off, PIECE_BYTES, s->written + off) != PIECE_BYTES) return 0;
            s->written += BUFFER_BYTES;
            if (s->written - s->started_writeback >= WRITEBACK_EVERY) {
                sync_file_range(s->fd, s->started_writeback, s->written - s->started_writeback,
                                SYNC_FILE_RANGE_WRITE);
                s->started_writeback = s->written;
            }
            hand_over(s);
        }
    }
    return size * count;
}

static void *hasher(void *user) {
    Stream *s = user;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (s->head == s->tail && !s->done) pthread_cond_wait(&s->changed, &s->lock);
        if (s->head == s->tail) break;
        int slot = s->head % RING;
        pthread_mutex_unlock(&s->lock);
        EVP_DigestUpdate(s->sha256, s->data[slot], s->filled[slot]);
        pthread_mutex_lock(&s->lock);
        s->head++;
        pthread_cond_broadcast(&s->changed);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s URL OUT SIZE SHA256\n", argv[0]);
        return 2;
    }
    long long size = atoll(argv[3]);
    char part[4096];
    snprintf(part, sizeof part, "%s.part", argv[2]);
    Stream s = {.lock = PTHREAD_MUTEX_INITIALIZER, .changed = PTHREAD_COND_INITIALIZER};
    for (int i = 0; i < RING; i++) s.data[i] = malloc(BUFFER_BYTES);
    s.sha256 = EVP_MD_CTX_new();
    EVP_DigestInit_ex(s.sha256, EVP_sha256(), NULL);
    s.fd = open(part, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (s.fd < 0) return perror(part), 1;
    pthread_t thread;
    pthread_create(&thread, NULL, hasher, &s);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    CURL *handle = curl_easy_init();
    curl_easy_setopt(handle, CURLOPT_URL, argv[1]);
    curl_easy_setopt(handle, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(handle, CURLOPT_WRITEDATA, &s);
    curl_easy_setopt(handle, CURLOPT_BUFFERSIZE, 256L * 1024);
    CURLcode code = curl_easy_perform(handle);
    long status = 0;
    curl_easy_getinfo(handle, CURLINFO_RESPONSE_CODE, &status);
    int slot = s.tail % RING; /* the last, partly filled buffer */
    if (s.filled[slot] && pwrite(s.fd, s.data[slot], s.filled[slot], s.written) != (ssize_t)s.filled[slot]) code = 1;
    s.written += s.filled[slot];
    pthread_mutex_lock(&s.lock);
    s.tail++;
    s.done = 1;
    pthread_cond_broadcast(&s.changed);
    pthread_mutex_unlock(&s.lock);
    pthread_join(thread, NULL);
    unsigned char digest[32];
    char hex[65];
    EVP_DigestFinal_ex(s.sha256, digest, NULL);
    for (int i = 0; i < 32; i++) sprintf(hex + 2 * i, "%02x", digest[i]);
    if (code != CURLE_OK || status != 200 || s.written != size || strcmp(hex, argv[4]) != 0) {
        fprintf(stderr, "bare_c_stream: %s: curl %d, HTTP %ld, %lld bytes, sha256 %s\n", argv[1], code, status, s.written,
                hex);
        return 1;
    }
    if (fsync(s.fd) != 0 || close(s.fd) != 0 || rename(part, argv[2]) != 0) return perror(argv[2]), 1;
    int folder = open(dirname(part), O_RDONLY | O_DIRECTORY);
    if (folder < 0 || fsync(folder) != 0) return perror("fsync of the folder"), 1;
    return 0;
}
