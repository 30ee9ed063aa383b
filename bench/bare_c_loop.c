/* A baseline for bench/downloads.py, not part of the package: the least a C program does for the engine's guarantees
 * on many small files, to show what the small-file target asks of any engine on this machine.
 *
 * Each of PROCESSES forked processes runs one libcurl multi loop over its share of the files (every PROCESSES-th
 * line), TRANSFERS / PROCESSES at a time: each body is gathered in memory, its size and sha256 (OpenSSL) checked,
 * written to NAME.part and its writeback started at once (sync_file_range, so that the final syncfs finds little
 * left); at the end one syncfs, the renames from .part, one fsync of the folder. No resume, retry, redirect rules,
 * progress or records. With `nosync` as the last argument the durability steps are skipped.
 *
 * Usage: bare_c_loop LIST OUT_DIR PROCESSES TRANSFERS [nosync]   (LIST: "url name sha256 size" per line)
 * Build: gcc -O2 -o bare_c_loop bare_c_loop.c -lcurl -lcrypto  (Debian: libcurl4-openssl-dev libssl-dev)
 * Exit status 0 when every file arrived whole and matched; otherwise a line on stderr names the first that did not.
 */
#define _GNU_SOURCE
#include <curl/curl.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct {
    char url[1024], name[256], sha256[65];
    long size;
    char *body;
    size_t received;
} File;

static size_t gather(char *data, size_t size, size_t count, void *user) {
    File *file = user;
    size_t bytes = size * count;
    if (file->received + bytes > (size_t)file->size) return 0; /* more than the list says: libcurl ends it */
    memcpy(file->body + file->received, data, bytes);
    file->received += bytes;
    return bytes;
}

static void start(CURLM *multi, CURL *handle, File *file) {
    file->body = malloc(file->size ? file->size : 1);
    file->received = 0;
    curl_easy_setopt(handle, CURLOPT_URL, file->url);
    curl_easy_setopt(handle, CURLOPT_WRITEFUNCTION, gather);
    curl_easy_setopt(handle, CURLOPT_WRITEDATA, file);
    curl_easy_setopt(handle, CURLOPT_PRIVATE, file);
    curl_multi_add_handle(multi, handle);
}

static int fail(const File *file, const char *why) {
    fprintf(stderr, "bare_c_loop: %s: %s\n", file->name, why);
    return 1;
}

/* One process's share: files first, first + step, ...; returns 0 when all of them are in place. */
static int fetch_share(File *files, int count, int first, int step, int transfers, int folder, int durable) {
    CURLM *multi = curl_multi_init();
    int next = first, running = 0, done = 0;
    int *finished = malloc(sizeof(int) * (count / step + 1));
    for (int i = 0; i < transfers && next < count; i++, next += step, running++) {
        CURL *handle = curl_easy_init();
        curl_easy_setopt(handle, CURLOPT_NOSIGNAL, 1L);
        start(multi, handle, &files[next]);
    }
    while (running) {
        int active, left;
        curl_multi_perform(multi, &active);
        CURLMsg *message;
        while ((message = curl_multi_info_read(multi, &left))) {
            CURL *handle = message->easy_handle;
            File *file;
            long status = 0;
            curl_easy_getinfo(handle, CURLINFO_PRIVATE, (char **)&file);
            curl_easy_getinfo(handle, CURLINFO_RESPONSE_CODE, &status);
            curl_multi_remove_handle(multi, handle);
            running--;
            if (message->data.result != CURLE_OK) return fail(file, curl_easy_strerror(message->data.result));
            if (status != 200 || (long)file->received != file->size) return fail(file, "wrong status or size");
            unsigned char digest[32];
            char hex[65];
            EVP_Digest(file->body, file->received, digest, NULL, EVP_sha256(), NULL);
            for (int i = 0; i < 32; i++) sprintf(hex + 2 * i, "%02x", digest[i]);
            if (strcmp(hex, file->sha256) != 0) return fail(file, "sha256 mismatch");
            char part[300];
            snprintf(part, sizeof part, "%s.part", file->name);
            int fd = openat(folder, part, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd < 0 || write(fd, file->body, file->received) != (ssize_t)file->received) return fail(file, "write");
            if (durable) sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
            close(fd);
            free(file->body);
            finished[done++] = (int)(file - files);
            if (next < count) {
                start(multi, handle, &files[next]);
                next += step;
                running++;
            } else {
                curl_easy_cleanup(handle);
            }
        }
        if (running) curl_multi_poll(multi, NULL, 0, 1000, NULL);
    }
    if (durable && syncfs(folder) != 0) return fail(&files[first], "syncfs");
    for (int i = 0; i < done; i++) {
        char part[300];
        snprintf(part, sizeof part, "%s.part", files[finished[i]].name);
        if (renameat(folder, part, folder, files[finished[i]].name) != 0) return fail(&files[finished[i]], "rename");
    }
    if (durable && fsync(folder) != 0) return fail(&files[first], "fsync of the folder");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s LIST OUT_DIR PROCESSES TRANSFERS [nosync]\n", argv[0]);
        return 2;
    }
    int processes = atoi(argv[3]), transfers = atoi(argv[4]);
    int durable = !(argc > 5 && strcmp(argv[5], "nosync") == 0);
    FILE *list = fopen(argv[1], "r");
    int folder = open(argv[2], O_RDONLY | O_DIRECTORY);
    if (!list || folder < 0 || processes < 1 || transfers < processes) {
        fprintf(stderr, "bare_c_loop: cannot read %s or open %s, or bad counts\n", argv[1], argv[2]);
        return 2;
    }
    int count = 0, capacity = 1024;
    File *files = malloc(sizeof(File) * capacity);
    while (fscanf(list, "%1023s %255s %64s %ld", files[count].url, files[count].name, files[count].sha256,
                  &files[count].size) == 4) {
        if (++count == capacity) files = realloc(files, sizeof(File) * (capacity *= 2));
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    for (int i = 0; i < processes; i++) {
        pid_t pid = fork();
        if (pid < 0) return fail(&files[0], "fork");
        if (pid == 0) _exit(fetch_share(files, count, i, processes, transfers / processes, folder, durable));
    }
    int status, failed = 0;
    while (wait(&status) > 0) failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    return failed;
}
