/*
 * mempressure_client: the 2013 mempressure proposal's example program, written to its ABI only.
 *
 * Build: cc -O2 -pthread -o mempressure_client mempressure_client.c
 * Run:   ./mempressure_client [-r MIB_PER_S] [-p PINNED] [-b BATCH] [-l LEVEL] DIR TOTAL_MIB SECONDS
 *
 * DIR is a controller directory (a kernel with the patch, or pyshrinkerd's mount) holding
 * cgroup.event_control, mempressure.shrinker and mempressure.level. The program:
 *
 *   1. registers a shrinker: eventfd(0, 0), then "<efd> <fd of mempressure.shrinker> 1048576\n"
 *      written to cgroup.event_control (and, with -l, "<efd2> <fd of mempressure.level> LEVEL\n");
 *   2. thread 1 allocates 1 MiB chunks (mmap'd and touched, so freeing one returns it to the
 *      kernel at once) at up to -r MiB/s, holding at most TOTAL_MIB, and reports them with
 *      "<efd> <N>\n" to mempressure.shrinker in batches of -b chunks;
 *   3. thread 2 polls the eventfd(s): a shrinker read gives N chunks to free (the controller has
 *      already subtracted them); it frees up to N of the chunks it may free (the first -p chunks
 *      are "pinned", in use, never freed) and re-adds those it could not free with
 *      "<efd> <unfreed>\n";
 *   4. after SECONDS it prints one JSON line with its figures and exits (the controller forgets
 *      a process's registrations when it exits; the 2013 ABI has no unregistration line).
 *
 * Before anything else it prints {"event": "registered", "pid": ..., "efd": ...} on stdout.
 * No pyshrinker header or library is used: this is what any C program would write.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define CHUNK_SIZE (1UL << 20)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t freed_cond; /* on CLOCK_MONOTONIC, set up in main */

static void **chunks;          /* a stack of held chunks; the first `pinned` are never freed */
static long held, peak_held, pinned, total;
static long pending;           /* allocated, not yet reported */
static long reported;          /* what the controller believes we hold */
static long allocated, requests, chunks_requested, chunks_freed, chunks_readded;
static long reports, report_errors, level_events;
static int efd = -1, level_efd = -1, shrinker_fd = -1, stop_fd = -1;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One write is one line: the controller parses each write on its own. Called with the lock. */
static void report(long n)
{
	char line[64];
	int len;

	if (n == 0)
		return;
	len = snprintf(line, sizeof(line), "%d %ld\n", efd, n);
	if (write(shrinker_fd, line, len) != len) {
		report_errors++;
		fprintf(stderr, "mempressure_client: report '%d %ld': %s\n", efd, n, strerror(errno));
		return;
	}
	reports++;
	reported += n;
}

static void flush_pending(void)
{
	long n = pending;

	pending = 0;
	report(n);
}

static void on_request(void)
{
	uint64_t asked;
	long n, freed = 0;

	if (read(efd, &asked, sizeof(asked)) != sizeof(asked))
		return;
	pthread_mutex_lock(&lock);
	/* Chunks allocated but not yet reported must be known before we count what we free. */
	flush_pending();
	requests++;
	chunks_requested += (long)asked;
	reported -= (long)asked; /* the controller subtracted them before signalling */
	n = (long)asked;
	while (freed < n && held > pinned) {
		munmap(chunks[--held], CHUNK_SIZE);
		freed++;
	}
	chunks_freed += freed;
	if (freed < n) {
		/* Could not free them all (pinned, or already gone): give the rest back. */
		chunks_readded += n - freed;
		report(n - freed);
	}
	pthread_cond_signal(&freed_cond);
	pthread_mutex_unlock(&lock);
}

static void *reclaimer(void *arg)
{
	struct pollfd fds[3] = {
		{ .fd = stop_fd, .events = POLLIN },
		{ .fd = efd, .events = POLLIN },
		{ .fd = level_efd, .events = POLLIN },
	};
	uint64_t value;

	(void)arg;
	for (;;) {
		if (poll(fds, level_efd >= 0 ? 3 : 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("mempressure_client: poll");
			return NULL;
		}
		if (fds[0].revents)
			return NULL;
		if (fds[1].revents)
			on_request();
		if (level_efd >= 0 && fds[2].revents && read(level_efd, &value, sizeof(value)) > 0) {
			pthread_mutex_lock(&lock);
			level_events++;
			pthread_mutex_unlock(&lock);
		}
	}
}

static int open_in(const char *dir, const char *name, int flags)
{
	char path[4096];
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, flags | O_CLOEXEC);
	if (fd < 0)
		fprintf(stderr, "mempressure_client: open %s: %s\n", path, strerror(errno));
	return fd;
}

static int write_line(int fd, const char *line, const char *what)
{
	ssize_t len = (ssize_t)strlen(line);

	if (write(fd, line, len) != len) {
		fprintf(stderr, "mempressure_client: %s '%.*s': %s\n", what, (int)len - 1, line,
			strerror(errno));
		return -1;
	}
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: mempressure_client [-r MIB_PER_S] [-p PINNED] [-b BATCH] "
			"[-l low|medium|oom] DIR TOTAL_MIB SECONDS\n");
	exit(2);
}

int main(int argc, char **argv)
{
	double rate = 0, seconds, start, end, next;
	long batch = 8;
	const char *level = NULL, *dir;
	char line[128];
	int control_fd, level_fd = -1, opt;
	pthread_t thread;
	void *chunk;

	while ((opt = getopt(argc, argv, "r:p:b:l:")) != -1) {
		switch (opt) {
		case 'r': rate = atof(optarg); break;
		case 'p': pinned = atol(optarg); break;
		case 'b': batch = atol(optarg); break;
		case 'l': level = optarg; break;
		default: usage();
		}
	}
	if (argc - optind != 3)
		usage();
	dir = argv[optind];
	total = atol(argv[optind + 1]);
	seconds = atof(argv[optind + 2]);
	if (total <= 0 || seconds < 0 || batch <= 0 || pinned < 0 || rate < 0)
		usage();
	chunks = calloc(total, sizeof(*chunks));
	if (!chunks)
		return 1;
	pthread_condattr_t cond_attr;
	pthread_condattr_init(&cond_attr);
	pthread_condattr_setclock(&cond_attr, CLOCK_MONOTONIC);
	pthread_cond_init(&freed_cond, &cond_attr);

	/* 1. Register: open the two files, create the eventfd, write the line. */
	control_fd = open_in(dir, "cgroup.event_control", O_WRONLY);
	shrinker_fd = open_in(dir, "mempressure.shrinker", O_WRONLY);
	if (control_fd < 0 || shrinker_fd < 0)
		return 1;
	efd = eventfd(0, EFD_CLOEXEC);
	stop_fd = eventfd(0, EFD_CLOEXEC);
	if (efd < 0 || stop_fd < 0) {
		perror("mempressure_client: eventfd");
		return 1;
	}
	snprintf(line, sizeof(line), "%d %d %lu\n", efd, shrinker_fd, CHUNK_SIZE);
	if (write_line(control_fd, line, "register"))
		return 1;
	if (level) {
		level_fd = open_in(dir, "mempressure.level", O_RDONLY);
		level_efd = eventfd(0, EFD_CLOEXEC);
		if (level_fd < 0 || level_efd < 0)
			return 1;
		snprintf(line, sizeof(line), "%d %d %s\n", level_efd, level_fd, level);
		if (write_line(control_fd, line, "register level"))
			return 1;
	}
	printf("{\"event\": \"registered\", \"pid\": %d, \"efd\": %d}\n", getpid(), efd);
	fflush(stdout);

	/* 3. Thread 2: wait for requests. */
	if (pthread_create(&thread, NULL, reclaimer, NULL)) {
		fprintf(stderr, "mempressure_client: pthread_create failed\n");
		return 1;
	}

	/* 2. Thread 1: allocate, touch and report chunks until SECONDS are up. */
	start = next = now();
	end = start + seconds;
	while (now() < end) {
		pthread_mutex_lock(&lock);
		if (held >= total) {
			/* Full: wait until a request frees something, or the time is up. */
			struct timespec until;
			double t = end;
			until.tv_sec = (time_t)t;
			until.tv_nsec = (long)((t - (double)until.tv_sec) * 1e9);
			flush_pending();
			pthread_cond_timedwait(&freed_cond, &lock, &until);
			pthread_mutex_unlock(&lock);
			next = now();
			continue;
		}
		pthread_mutex_unlock(&lock);
		chunk = mmap(NULL, CHUNK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (chunk == MAP_FAILED) {
			perror("mempressure_client: mmap");
			break;
		}
		memset(chunk, 0x5a, CHUNK_SIZE);
		pthread_mutex_lock(&lock);
		chunks[held++] = chunk;
		if (held > peak_held)
			peak_held = held;
		allocated++;
		if (++pending >= batch)
			flush_pending();
		pthread_mutex_unlock(&lock);
		if (rate > 0) {
			next += 1.0 / rate;
			double wait = next - now();
			if (wait > 0) {
				struct timespec ts = { (time_t)wait, (long)((wait - (long)wait) * 1e9) };
				nanosleep(&ts, NULL);
			}
		}
	}

	uint64_t one = 1;
	if (write(stop_fd, &one, sizeof(one)) != sizeof(one))
		perror("mempressure_client: stop");
	pthread_join(thread, NULL);
	pthread_mutex_lock(&lock);
	flush_pending();
	printf("{\"pid\": %d, \"efd\": %d, \"duration_s\": %.3f, \"allocated_mib\": %ld, "
	       "\"held_mib\": %ld, \"peak_held_mib\": %ld, \"reported\": %ld, \"requests\": %ld, "
	       "\"chunks_requested\": %ld, \"chunks_freed\": %ld, \"chunks_readded\": %ld, "
	       "\"reports\": %ld, \"report_errors\": %ld, \"level_events\": %ld}\n",
	       getpid(), efd, now() - start, allocated, held, peak_held, reported, requests,
	       chunks_requested, chunks_freed, chunks_readded, reports, report_errors, level_events);
	pthread_mutex_unlock(&lock);
	return report_errors ? 1 : 0;
}
