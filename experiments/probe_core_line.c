// The round trip of a cache line between two cores, in C, without Python's loop around it:
// experiments/PERFORMANCE.md ("Why the two-core time has two levels") quotes its two levels.
// Two threads, pinned to the first two usable cores, hand a counter back and forth through one
// cache line `iters` times (odd: the first thread's turn is over; even: the second's), and time a
// pipe round trip (a wake-up of the other thread) before each such burst, every 50 ms for
// `seconds`. Prints one line a burst: "seconds line_round_trip_ns pipe_round_trip_us".
//
//   gcc -O2 -pthread -o /tmp/probe_core_line experiments/probe_core_line.c
//   /tmp/probe_core_line 150 100000 > experiments/results/probe_core_line.txt
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static _Atomic long ball __attribute__((aligned(64)));
static int to_other[2], from_other[2];
static long iters;
static int cores[2];

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int pin(int core) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(core, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *other(void *unused) {
  (void)unused;
  if (pin(cores[1]) != 0) exit(3);
  for (;;) {
    char c;
    if (read(to_other[0], &c, 1) != 1 || c == 'q') return NULL;
    if (c == 'p') {  // the pipe's round trip: answer at once
      if (write(from_other[1], &c, 1) != 1) exit(4);
      continue;
    }
    for (long i = 0; i < iters; i++) {  // 'l': the cache line's, `iters` times
      long v;
      while (((v = atomic_load(&ball)) & 1) == 0) {
      }
      atomic_store(&ball, v + 1);
    }
  }
}

int main(int argc, char **argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 60;
  iters = argc > 2 ? atol(argv[2]) : 100000;
  cpu_set_t usable;
  if (seconds <= 0 || iters < 1 || sched_getaffinity(0, sizeof usable, &usable) != 0) {
    fprintf(stderr, "usage: %s SECONDS ITERS (both positive), on Linux\n", argv[0]);
    return 2;
  }
  int n = 0;
  for (int c = 0; c < CPU_SETSIZE && n < 2; c++)
    if (CPU_ISSET(c, &usable)) cores[n++] = c;
  if (n < 2) {
    fprintf(stderr, "needs 2 usable cores\n");
    return 2;
  }
  if (pipe(to_other) || pipe(from_other)) return 1;
  pthread_t thread;
  pthread_create(&thread, NULL, other, NULL);
  if (pin(cores[0]) != 0) return 3;
  double t0 = now();
  while (now() - t0 < seconds) {
    char c = 'p';
    double s = now();
    for (int i = 0; i < 50; i++)
      if (write(to_other[1], &c, 1) != 1 || read(from_other[0], &c, 1) != 1) return 4;
    double pipe_us = (now() - s) / 50 * 1e6;
    c = 'l';
    atomic_store(&ball, 0);
    if (write(to_other[1], &c, 1) != 1) return 4;
    s = now();
    for (long i = 0; i < iters; i++) {
      atomic_store(&ball, 2 * i + 1);
      while (atomic_load(&ball) != 2 * i + 2) {
      }
    }
    double line_ns = (now() - s) / iters * 1e9;
    printf("%.3f %.1f %.2f\n", now() - t0, line_ns, pipe_us);
    fflush(stdout);
    usleep(50000);
  }
  char c = 'q';
  if (write(to_other[1], &c, 1) != 1) return 4;
  pthread_join(thread, NULL);
  return 0;
}
