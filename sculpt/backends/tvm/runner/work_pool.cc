// sculpt's CPU thread pool for TVM-generated code: each thread runs its own share of a parallel loop
// first, then the parts of the other threads' shares that they have not started.
//
// TVM's generated code runs a parallel loop by calling the function that the library's
// `__TVMBackendParallelLaunch` pointer holds (the runtime fills it when it loads the library) with
// a lambda that runs chunk `task_id` of `num_task` equal chunks of the loop. TVM's own pool gives
// each thread one chunk, so every loop waits for its slowest thread: on a device whose cores also
// run other processes, a descheduled thread stalls every loop. This pool splits each loop into
// `threads * tasks_per_thread` chunks; chunk i belongs to thread i % threads (a thread meets the same
// rows and channel blocks from one loop to the next, as with a static split, so they stay in its
// cache); a thread runs its own chunks in order, then claims the unstarted chunks of the others. A
// thread that wakes late finds its share done and sleeps again.
//
// sculpt_pool_install_library(path) points a loaded library's `__TVMBackendParallelLaunch` at the
// pool (after the runtime has filled it); the deploy runner and sculpt.backends.tvm.work_pool call it. Settings, read once when the pool starts (its first launch):
//   SCULPT_POOL_THREADS           threads (else TVM_NUM_THREADS, else the cores this process may use)
//   SCULPT_POOL_TASKS_PER_THREAD  chunks per thread and loop (default 4)
//   SCULPT_POOL_SPIN_US           how long a worker polls for the next loop before it sleeps
//                                 (default 200 microseconds)
//   SCULPT_POOL_SPREAD            1 (default): a worker found on its caller's core while another core
//                                 is idle moves off it (KeepOffCallersCore); 0: the kernel's placement
//   SCULPT_POOL_CALLER_POLL_US    how long a caller polls for the other threads' chunks before it
//                                 yields its core (default a quarter of the scheduler tick: 1000 at 250 Hz)
//
// Linux only (futex): the host, aarch64 Linux and Android. Built into the deploy runner and, for
// the Python API, into a small shared library (sculpt.backends.tvm.work_pool).

#include <dlfcn.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <cstdlib>

namespace {

constexpr int kMaxThreads = 64;
// A caller waiting for other threads' chunks polls kCallerPolls times and on for caller_poll_ns more,
// then yields its core kCallerYields times, then sleeps.
constexpr int kCallerPolls = 200;
constexpr int kCallerYields = 2000;
// The cores are contended when the pool's threads were preempted kRecentPreemptions times within
// kContendedWindow (an idle machine preempts them a few times a second, a busy one every few ms).
constexpr int kRecentPreemptions = 4;
constexpr int64_t kContendedWindowNs = 40'000'000;
constexpr int64_t kLoadavgPeriodNs = 10'000'000;

struct ParallelGroupEnv {  // TVMParallelGroupEnv
  void* sync_handle;
  int32_t num_task;
};

using ParallelLambda = int (*)(int task_id, ParallelGroupEnv* penv, void* cdata);

// One counter per owner: the job's generation in the high 32 bits, then the end (16 bits) and the
// start (16 bits) of the owner's unclaimed chunks. A claim is a compare-and-swap of the whole word,
// so a thread that wakes after its job ended never claims a chunk of the next one.
struct alignas(64) OwnerCounter {
  std::atomic<uint64_t> next{0};
};

struct Pool {
  int threads = 1, tasks_per_thread = 4, spin_us = 200, cpus = 1;
  cpu_set_t start_mask;  // the cores the process could use when the pool started: the workers' own affinity
  bool spread = true;
  int64_t caller_poll_ns = 1'000'000;  // how long a caller polls for other threads' chunks
  const char* loadavg_path = "/proc/loadavg";  // SCULPT_POOL_LOADAVG: another file, for tests
  std::atomic<int> caller_cpu{-1};  // the core the caller last launched a loop from
  std::atomic<long> moves_off_caller{0};  // times a worker left its caller's core (KeepOffCallersCore)
  std::atomic<long> caller_yields{0};  // loops whose caller yielded its core waiting for other threads
  pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_mutex_t launch_lock = PTHREAD_MUTEX_INITIALIZER;  // one job at a time
  alignas(64) std::atomic<uint32_t> generation{0};
  std::atomic<int> sleepers{0};
  // the job: written by the caller while no chunk of any job can be claimed
  ParallelLambda lambda = nullptr;
  void* cdata = nullptr;
  int num_task = 0;
  ParallelGroupEnv env{nullptr, 0};
  alignas(64) std::atomic<uint32_t> done{0};  // chunks finished
  std::atomic<int> caller_sleeps{0};
  std::atomic<int> failed{0};
  int launches = 0;  // by the caller holding launch_lock
  long caller_preempted = 0;
  // when the pool's threads were last preempted (steady clock, ns), kRecentPreemptions of them
  std::atomic<int64_t> preemptions[kRecentPreemptions] = {};
  std::atomic<unsigned> next_preemption{0};
  OwnerCounter owners[kMaxThreads];
};

Pool pool;
thread_local bool in_task = false;

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex words are 32 bits");

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

long Futex(std::atomic<uint32_t>* word, int op, uint32_t value) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, nullptr, nullptr, 0);
}

int EnvInt(const char* name, int fallback, int lo, int hi) {
  const char* s = getenv(name);
  if (s == nullptr || *s == '\0') return fallback;
  char* end = nullptr;
  long v = strtol(s, &end, 10);
  if (*end != '\0' || v < lo || v > hi) return fallback;
  return static_cast<int>(v);
}

int64_t NowNs(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

// Records when this thread was preempted (involuntary context switches since `*seen`).
void NotePreemptions(long* seen) {
  struct rusage usage;
  if (getrusage(RUSAGE_THREAD, &usage) != 0 || usage.ru_nivcsw == *seen) return;
  *seen = usage.ru_nivcsw;
  int64_t now = NowNs(std::chrono::steady_clock::now());
  pool.preemptions[pool.next_preemption.fetch_add(1) % kRecentPreemptions].store(now);
}

// Whether other processes want these cores now: then a worker moved off its caller's core gets its
// own affinity back.
bool Contended(std::chrono::steady_clock::time_point now) {
  int64_t since = NowNs(now) - kContendedWindowNs;
  for (const auto& t : pool.preemptions)
    if (t.load(std::memory_order_relaxed) < since) return false;
  return true;
}

// Runnable tasks in the system now (/proc/loadavg's "running/total"), or -1.
int RunnableTasks() {
  FILE* f = fopen(pool.loadavg_path, "re");
  if (f == nullptr) return -1;
  double a, b, c;
  int running = -1, total = 0;
  if (fscanf(f, "%lf %lf %lf %d/%d", &a, &b, &c, &running, &total) != 5) running = -1;
  fclose(f);
  return running;
}

// A worker that starts a loop on its caller's core while another core is idle moves off it, and
// stays off until other processes contend or no core is spare. The kernel places a woken thread on the core of the thread that
// woke it when it sees fit; there the two took turns on one core while the other stood idle, each
// preempting the other (which the contended rule then read as other processes' load). After a pause (a
// camera's 33 ms between frames), 2 threads: doc-orientation 3.7-3.9 ms per inference against
// 2.2-2.4 off the caller's core (onnxruntime 2.1-2.3), SqueezeNet 5.6 against 3.1 (3.0-3.2).
// Then the worker's own affinity comes back and the kernel places it. A worker beside its caller on a
// busy machine reads /proc/loadavg at most every kLoadavgPeriodNs (`*next_read_ns`; a read costs
// ~10 us, a loop can take less).
void KeepOffCallersCore(const cpu_set_t* own_mask, bool* narrowed, int64_t* next_read_ns) {
  int caller = pool.caller_cpu.load(std::memory_order_relaxed);
  if (caller >= 0 && sched_getcpu() == caller) {
    int64_t now = NowNs(std::chrono::steady_clock::now());
    if (now < *next_read_ns) return;
    int running = RunnableTasks();
    if (running < 0 || running > pool.cpus) {  // no core to spare: the kernel places the worker
      *next_read_ns = now + kLoadavgPeriodNs;
      if (*narrowed) *narrowed = sched_setaffinity(0, sizeof(*own_mask), own_mask) != 0;
      return;
    }
    cpu_set_t others = *own_mask;
    CPU_CLR(caller, &others);
    if (CPU_COUNT(&others) > 0 && sched_setaffinity(0, sizeof(others), &others) == 0) {
      *narrowed = true;
      pool.moves_off_caller.fetch_add(1, std::memory_order_relaxed);
    }
  } else if (*narrowed && Contended(std::chrono::steady_clock::now())) {
    *narrowed = sched_setaffinity(0, sizeof(*own_mask), own_mask) != 0;
  }
}

int OwnedChunks(int owner, int num_task) {  // chunks owner, owner + threads, ... below num_task
  return owner < num_task ? (num_task - owner + pool.threads - 1) / pool.threads : 0;
}

uint64_t CounterWord(uint32_t gen, int front, int back) {
  return (static_cast<uint64_t>(gen) << 32) | (static_cast<uint64_t>(back) << 16) | static_cast<uint64_t>(front);
}

// Claims and runs chunks of `owner` in job `gen` until none is left: the owner from the front of its
// share, other threads from the back (the owner keeps the order it would have run them in).
void RunShare(int owner, uint32_t gen, bool thief) {
  std::atomic<uint64_t>& counter = pool.owners[owner].next;
  for (;;) {
    uint64_t c = counter.load(std::memory_order_acquire);
    if (static_cast<uint32_t>(c >> 32) != gen) return;
    int front = static_cast<int>(c & 0xffff), back = static_cast<int>((c >> 16) & 0xffff);
    if (front >= back) return;
    int k = thief ? back - 1 : front;
    uint64_t claimed = k == front ? CounterWord(gen, front + 1, back) : CounterWord(gen, front, back - 1);
    if (!counter.compare_exchange_weak(c, claimed, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    // a chunk of this job is claimed and unfinished: the job's fields cannot change until it is done
    int num_task = pool.num_task;
    in_task = true;
    if (pool.lambda(owner + k * pool.threads, &pool.env, pool.cdata) != 0) pool.failed.store(1);
    in_task = false;
    if (static_cast<int>(pool.done.fetch_add(1) + 1) >= num_task && pool.caller_sleeps.load())
      Futex(&pool.done, FUTEX_WAKE_PRIVATE, 1);
  }
}

void RunJob(int self, uint32_t gen) {
  RunShare(self, gen, false);
  for (int i = 1; i < pool.threads; i++) RunShare((self + i) % pool.threads, gen, true);
}

void* WorkerMain(void* arg) {
  int self = static_cast<int>(reinterpret_cast<intptr_t>(arg));
  uint32_t seen = pool.generation.load();
  long preempted = 0;  // involuntary context switches of this thread so far
  bool narrowed = false;
  int64_t next_loadavg_read = 0;
  // the pool's start mask, not this thread's affinity read here: whoever started the pool may pin this
  // thread before it runs a line, and a worker whose own affinity is its caller's core cannot move off it
  cpu_set_t own_mask = pool.start_mask;
  for (;;) {
    uint32_t gen;
    // the next loop usually follows within microseconds (the model's next kernel): poll for
    // spin_us before sleeping, which would cost a wake-up per loop. Also while other processes
    // contend for the cores: a worker asleep after every loop is one the caller waits for, and once
    // the caller polls rather than yields (below), polling 200 us did better under load: both cores
    // busy with other processes, ddddocr 14.8-14.9 ms against 19.4-19.6 asleep, SqueezeNet 6.8-6.9
    // against 7.7-7.9, PP-OCRv4 rec 14.0-14.6 against 16.0-16.1 (onnxruntime 15.0, 6.7-6.9, 22-26).
    NotePreemptions(&preempted);
    auto now = std::chrono::steady_clock::now();
    auto spin_end = now + std::chrono::microseconds(pool.spin_us);
    int polls = 0;
    while ((gen = pool.generation.load(std::memory_order_acquire)) == seen) {
      if (++polls % 32 != 0 || std::chrono::steady_clock::now() < spin_end) {
        CpuRelax();
        continue;
      }
      // sleepers is raised before the generation is read again and the caller reads it after
      // publishing: either this thread sees the new job or the caller wakes it
      pool.sleepers.fetch_add(1);
      if (pool.generation.load() == seen) Futex(&pool.generation, FUTEX_WAIT_PRIVATE, seen);
      pool.sleepers.fetch_sub(1);
    }
    seen = gen;
    if (pool.spread) KeepOffCallersCore(&own_mask, &narrowed, &next_loadavg_read);
    RunJob(self, gen);
  }
  return nullptr;
}

void StartPool() {
  int cores = 1;
  CPU_ZERO(&pool.start_mask);  // stays empty if unknown: a worker then never leaves its caller's core
  if (sched_getaffinity(0, sizeof(pool.start_mask), &pool.start_mask) == 0) cores = CPU_COUNT(&pool.start_mask);
  int threads = EnvInt("TVM_NUM_THREADS", cores, 1, kMaxThreads);
  pool.threads = EnvInt("SCULPT_POOL_THREADS", threads, 1, kMaxThreads);
  pool.tasks_per_thread = EnvInt("SCULPT_POOL_TASKS_PER_THREAD", 4, 1, 1024);
  pool.spin_us = EnvInt("SCULPT_POOL_SPIN_US", 200, 0, 1000000);
  pool.cpus = cores;
  pool.spread = EnvInt("SCULPT_POOL_SPREAD", 1, 0, 1) == 1;
  // a quarter of the scheduler tick (the coarse clock's resolution) a yield may cost; 1 ms if unknown
  struct timespec tick;
  int poll_us = 1000;
  if (clock_getres(CLOCK_MONOTONIC_COARSE, &tick) == 0 && tick.tv_sec == 0 && tick.tv_nsec >= 4000) poll_us = tick.tv_nsec / 4000;
  pool.caller_poll_ns = 1000LL * EnvInt("SCULPT_POOL_CALLER_POLL_US", poll_us, 0, 1000000);
  const char* loadavg = getenv("SCULPT_POOL_LOADAVG");
  if (loadavg != nullptr && *loadavg != '\0') pool.loadavg_path = loadavg;
  for (int i = 1; i < pool.threads; i++) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int failed = pthread_create(&thread, &attr, WorkerMain, reinterpret_cast<void*>(static_cast<intptr_t>(i)));
    pthread_attr_destroy(&attr);
    if (failed) {
      pool.threads = i;  // run with the workers that started
      break;
    }
  }
}

// The loop in the calling thread: as one chunk, or as the `num_task` chunks asked for.
int RunAlone(ParallelLambda lambda, void* cdata, int num_task) {
  ParallelGroupEnv env{nullptr, num_task > 0 ? num_task : 1};
  int failed = 0;
  for (int task = 0; task < env.num_task; task++) failed |= lambda(task, &env, cdata) != 0;
  return failed ? -1 : 0;
}

}  // namespace

extern "C" {

// TVMBackendParallelLaunch's contract: run lambda(task_id, env, cdata) for task_id in [0, env.num_task);
// num_task 0 lets the pool choose. A launch from inside a chunk, or while another thread's job runs,
// runs in the calling thread alone (as one chunk when the pool may choose).
int sculpt_pool_launch(ParallelLambda lambda, void* cdata, int num_task) {
  pthread_once(&pool.once, StartPool);
  if (pool.threads <= 1 || in_task || pthread_mutex_trylock(&pool.launch_lock) != 0) return RunAlone(lambda, cdata, num_task);
  if (pool.launches++ % 4 == 0) NotePreemptions(&pool.caller_preempted);
  if (pool.spread) pool.caller_cpu.store(sched_getcpu(), std::memory_order_relaxed);
  int tasks = num_task > 0 ? num_task : pool.threads * pool.tasks_per_thread;
  if (OwnedChunks(0, tasks) > 0xffff) {
    pthread_mutex_unlock(&pool.launch_lock);
    return RunAlone(lambda, cdata, num_task);
  }
  uint32_t gen = pool.generation.load() + 1;
  // the counters move to the new generation first: from here on a thread still in the last job
  // can claim nothing, so nobody reads the fields below while they change
  for (int i = 0; i < pool.threads; i++) pool.owners[i].next.store(CounterWord(gen, 0, OwnedChunks(i, tasks)));
  std::atomic_thread_fence(std::memory_order_seq_cst);
  pool.lambda = lambda;
  pool.cdata = cdata;
  pool.num_task = tasks;
  pool.env = ParallelGroupEnv{nullptr, tasks};
  pool.done.store(0);
  pool.failed.store(0);
  pool.generation.store(gen);  // publishes the job
  if (pool.sleepers.load() > 0) Futex(&pool.generation, FUTEX_WAKE_PRIVATE, INT_MAX);
  RunJob(0, gen);
  // every chunk is claimed: wait for the ones other threads still run (at most one chunk each).
  // Polling for caller_poll_ns, then yielding the core (to the awaited thread, when it waits on this
  // core), then, if that thread was descheduled mid-chunk for long, asleep. Sleeping at once costs
  // a wake-up per loop, and on a busy core the woken caller waits for its turn (PP-OCRv4 det, 2
  // threads, both cores busy with other processes: 23 ms sleeping at once, 14 ms yielding). A yield
  // while another process waits for this core gives it the core until the next tick, though the
  // awaited chunk may end microseconds later: polling 200 times (~10 us) before yielding, PP-OCRv4
  // rec spent 11.6 of its 24 ms per run in such waits (3.3 per run, each ending on a tick); polling
  // up to 1 ms, 0.1 of 14-16 ms (squeezenet 3.2 of 9.4 -> 0.1 of 6.7-7.4).
  // (the deadline is read only once a wait outlasts kCallerPolls: most loops end before)
  std::chrono::steady_clock::time_point poll_end;
  bool polling = true;
  for (int polls = 0, yields = 0;;) {
    uint32_t done = pool.done.load();
    if (static_cast<int>(done) >= pool.num_task) break;
    if (polling) {
      CpuRelax();
      if (++polls == kCallerPolls) poll_end = std::chrono::steady_clock::now() + std::chrono::nanoseconds(pool.caller_poll_ns);
      polling = polls <= kCallerPolls || polls % 32 != 0 || std::chrono::steady_clock::now() < poll_end;
    } else if (yields < kCallerYields) {
      if (yields++ == 0) pool.caller_yields.fetch_add(1, std::memory_order_relaxed);
      sched_yield();
    } else {
      pool.caller_sleeps.store(1);
      if (pool.done.load() == done) Futex(&pool.done, FUTEX_WAIT_PRIVATE, done);
      pool.caller_sleeps.store(0);
    }
  }
  int failed = pool.failed.load();
  pthread_mutex_unlock(&pool.launch_lock);
  return failed ? -1 : 0;
}

// Points the parallel loops of a library the TVM runtime has loaded (its `__TVMBackendParallelLaunch`
// slot, which the runtime filled when it loaded the library) at this pool. Returns 1 when installed;
// 0 when the library keeps TVM's pool: no parallel loops, or loops with a barrier inside
// (`__TVMBackendParallelBarrier`: this pool runs chunks independently); -1 when the library is not
// loaded in this process; -2 when its slot is not filled yet.
int sculpt_pool_install_library(const char* path) {
  void* handle = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) return -1;
  void** slot = static_cast<void**>(dlsym(handle, "__TVMBackendParallelLaunch"));
  int status = 0;
  if (slot != nullptr && dlsym(handle, "__TVMBackendParallelBarrier") == nullptr) {
    status = *slot == nullptr ? -2 : 1;
    if (status == 1) *slot = reinterpret_cast<void*>(&sculpt_pool_launch);
  }
  dlclose(handle);  // the runtime's own reference keeps it loaded
  return status;
}

// How many times a worker has moved off its caller's core (KeepOffCallersCore).
long sculpt_pool_moves_off_caller(void) { return pool.moves_off_caller.load(); }

// Loops whose caller yielded its core while waiting for other threads' chunks.
long sculpt_pool_caller_yields(void) { return pool.caller_yields.load(); }

// The pool's thread count (starts the pool).
int sculpt_pool_threads(void) {
  pthread_once(&pool.once, StartPool);
  return pool.threads;
}

}  // extern "C"
