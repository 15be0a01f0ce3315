// CudaBackend: the CUDA driver, loaded at run time.
//
// libcuda.so.1 is dlopen'ed and every entry point comes from cuGetProcAddress, so the
// library links neither libcuda nor libcudart: it loads (and the simulated backend runs)
// on machines with no GPU or driver. cuda.h is used for types and constants only.
//
// Contexts: every call runs in the device's primary context, the one PyTorch uses. In an
// allocator callback the caller's context is already current; on other threads bind()
// makes the primary context current.
#include <dlfcn.h>

#include <cuda.h>

#include <mutex>
#include <string>
#include <vector>

#include "backend.h"

namespace aqua {
namespace {

// One member per driver entry point, typed from cuda.h's own prototypes.
struct Driver {
  decltype(&::cuInit) Init = nullptr;
  decltype(&::cuGetErrorName) GetErrorName = nullptr;
  decltype(&::cuDeviceGetCount) DeviceGetCount = nullptr;
  decltype(&::cuDeviceGet) DeviceGet = nullptr;
  decltype(&::cuDeviceCanAccessPeer) DeviceCanAccessPeer = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) DevicePrimaryCtxRetain = nullptr;
  decltype(&::cuCtxGetCurrent) CtxGetCurrent = nullptr;
  decltype(&::cuCtxSetCurrent) CtxSetCurrent = nullptr;
  decltype(&::cuMemGetInfo) MemGetInfo = nullptr;
  decltype(&::cuMemAddressReserve) MemAddressReserve = nullptr;
  decltype(&::cuMemAddressFree) MemAddressFree = nullptr;
  decltype(&::cuMemCreate) MemCreate = nullptr;
  decltype(&::cuMemRelease) MemRelease = nullptr;
  decltype(&::cuMemMap) MemMap = nullptr;
  decltype(&::cuMemUnmap) MemUnmap = nullptr;
  decltype(&::cuMemSetAccess) MemSetAccess = nullptr;
  decltype(&::cuMemGetAllocationGranularity) MemGetAllocationGranularity = nullptr;
  decltype(&::cuMemcpyAsync) MemcpyAsync = nullptr;
  decltype(&::cuStreamCreate) StreamCreate = nullptr;
  decltype(&::cuStreamWaitEvent) StreamWaitEvent = nullptr;
  decltype(&::cuEventCreate) EventCreate = nullptr;
  decltype(&::cuEventDestroy) EventDestroy = nullptr;
  decltype(&::cuEventRecord) EventRecord = nullptr;
  decltype(&::cuEventSynchronize) EventSynchronize = nullptr;
  decltype(&::cuCtxSynchronize) CtxSynchronize = nullptr;
  // Optional (the prefetch's GPU-side wait; without them resume(wait=False) waits on the host).
  decltype(&::cuMemHostAlloc) MemHostAlloc = nullptr;
  decltype(&::cuMemHostGetDevicePointer) MemHostGetDevicePointer = nullptr;
  decltype(&::cuStreamWaitValue32) StreamWaitValue32 = nullptr;
};

using GetProcAddressV2 = CUresult (*)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);

class CudaBackend final : public Backend {
 public:
  bool init(std::string* why) {
    lib_ = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib_) {
      *why = std::string("cannot load the CUDA driver (libcuda.so.1): ") + dlerror();
      return false;
    }
    auto get_proc = reinterpret_cast<GetProcAddressV2>(dlsym(lib_, "cuGetProcAddress_v2"));
    if (!get_proc) {
      *why = "the CUDA driver is too old: it has no cuGetProcAddress_v2 (CUDA 12 or newer needed)";
      return false;
    }
    bool ok = true;
    auto load = [&](const char* name, auto* fn) {
      void* p = nullptr;
      CUdriverProcAddressQueryResult status;
      if (get_proc(name, &p, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &status) != CUDA_SUCCESS || !p) {
        if (ok) *why = std::string("the CUDA driver has no entry point ") + name;
        ok = false;
      }
      *fn = reinterpret_cast<std::remove_reference_t<decltype(*fn)>>(p);
    };
    load("cuInit", &d_.Init);
    load("cuGetErrorName", &d_.GetErrorName);
    load("cuDeviceGetCount", &d_.DeviceGetCount);
    load("cuDeviceGet", &d_.DeviceGet);
    load("cuDeviceCanAccessPeer", &d_.DeviceCanAccessPeer);
    load("cuDevicePrimaryCtxRetain", &d_.DevicePrimaryCtxRetain);
    load("cuCtxGetCurrent", &d_.CtxGetCurrent);
    load("cuCtxSetCurrent", &d_.CtxSetCurrent);
    load("cuMemGetInfo", &d_.MemGetInfo);
    load("cuMemAddressReserve", &d_.MemAddressReserve);
    load("cuMemAddressFree", &d_.MemAddressFree);
    load("cuMemCreate", &d_.MemCreate);
    load("cuMemRelease", &d_.MemRelease);
    load("cuMemMap", &d_.MemMap);
    load("cuMemUnmap", &d_.MemUnmap);
    load("cuMemSetAccess", &d_.MemSetAccess);
    load("cuMemGetAllocationGranularity", &d_.MemGetAllocationGranularity);
    load("cuMemcpyAsync", &d_.MemcpyAsync);
    load("cuStreamCreate", &d_.StreamCreate);
    load("cuStreamWaitEvent", &d_.StreamWaitEvent);
    load("cuEventCreate", &d_.EventCreate);
    load("cuEventDestroy", &d_.EventDestroy);
    load("cuEventRecord", &d_.EventRecord);
    load("cuEventSynchronize", &d_.EventSynchronize);
    load("cuCtxSynchronize", &d_.CtxSynchronize);
    if (!ok) return false;
    auto load_optional = [&](const char* name, auto* fn) {
      void* p = nullptr;
      CUdriverProcAddressQueryResult status;
      if (get_proc(name, &p, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &status) != CUDA_SUCCESS) p = nullptr;
      *fn = reinterpret_cast<std::remove_reference_t<decltype(*fn)>>(p);
    };
    load_optional("cuMemHostAlloc", &d_.MemHostAlloc);
    load_optional("cuMemHostGetDevicePointer", &d_.MemHostGetDevicePointer);
    load_optional("cuStreamWaitValue32", &d_.StreamWaitValue32);

    CUresult r = d_.Init(0);
    if (r != CUDA_SUCCESS) {
      *why = "cuInit failed: " + error_name(r) + " (no usable GPU or driver)";
      return false;
    }
    int n = 0;
    if (d_.DeviceGetCount(&n) != CUDA_SUCCESS || n <= 0) {
      *why = "the CUDA driver sees no device";
      return false;
    }
    contexts_.resize(n);
    devices_.resize(n);
    for (int i = 0; i < n; ++i) {
      if ((r = d_.DeviceGet(&devices_[i], i)) != CUDA_SUCCESS ||
          (r = d_.DevicePrimaryCtxRetain(&contexts_[i], devices_[i])) != CUDA_SUCCESS) {
        *why = "cannot retain the primary context of device " + std::to_string(i) + ": " + error_name(r);
        return false;
      }
    }
    // Sizes and addresses are multiples of the largest minimum granularity of any tier.
    granularity_ = 0;
    for (int tier = -1; tier < n; ++tier) {
      CUmemAllocationProp prop = prop_for(tier);
      size_t g = 0;
      if (d_.MemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) == CUDA_SUCCESS &&
          g > granularity_)
        granularity_ = g;
    }
    if (granularity_ == 0) granularity_ = 2u << 20;
    peer_.assign(n * n, false);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        int can = i == j;
        if (i != j) d_.DeviceCanAccessPeer(&can, devices_[i], devices_[j]);
        peer_[i * n + j] = can != 0;
      }
    return true;
  }

  int kind() const override { return AQUA_BACKEND_CUDA; }
  int device_count() const override { return static_cast<int>(devices_.size()); }
  size_t granularity() const override { return granularity_; }
  bool can_access_peer(int device, int peer) const override {
    int n = device_count();
    if (device < 0 || peer < 0 || device >= n || peer >= n) return false;
    return peer_[device * n + peer];
  }
  std::string error_name(int code) const override {
    const char* name = nullptr;
    if (d_.GetErrorName && d_.GetErrorName(static_cast<CUresult>(code), &name) == CUDA_SUCCESS && name)
      return std::string(name) + " (" + std::to_string(code) + ")";
    return "CUresult " + std::to_string(code);
  }
  bool is_out_of_memory(int code) const override { return code == CUDA_ERROR_OUT_OF_MEMORY; }

  int bind(int device) override {
    if (device < 0 || device >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    CUcontext current = nullptr;
    d_.CtxGetCurrent(&current);
    if (current == contexts_[device]) return CUDA_SUCCESS;
    return d_.CtxSetCurrent(contexts_[device]);
  }

  uint64_t save_binding() override {
    CUcontext current = nullptr;
    d_.CtxGetCurrent(&current);
    return reinterpret_cast<uint64_t>(current);
  }
  void restore_binding(uint64_t saved) override {
    CUcontext current = nullptr;
    d_.CtxGetCurrent(&current);
    if (reinterpret_cast<uint64_t>(current) != saved) d_.CtxSetCurrent(reinterpret_cast<CUcontext>(saved));
  }
  int device_sync(int device) override {
    if (int r = bind(device)) return r;
    return d_.CtxSynchronize();
  }

  int mem_info(int device, size_t* free_bytes, size_t* total_bytes) override {
    if (int r = bind(device)) return r;
    return d_.MemGetInfo(free_bytes, total_bytes);
  }

  int reserve(size_t size, uintptr_t* va) override {
    CUdeviceptr p = 0;
    CUresult r = d_.MemAddressReserve(&p, size, granularity_, 0, 0);
    *va = static_cast<uintptr_t>(p);
    return r;
  }
  int free_va(uintptr_t va, size_t size) override { return d_.MemAddressFree(va, size); }

  int create(int tier, size_t size, Handle* handle) override {
    CUmemAllocationProp prop = prop_for(tier);
    CUmemGenericAllocationHandle h = 0;
    CUresult r = d_.MemCreate(&h, size, &prop, 0);
    if (r != CUDA_SUCCESS && tier == AQUA_TIER_HOST) {
      // Drivers that lack HOST_NUMA pinned allocations may still take plain HOST.
      prop.location.type = CU_MEM_LOCATION_TYPE_HOST;
      prop.location.id = 0;
      CUresult r2 = d_.MemCreate(&h, size, &prop, 0);
      if (r2 == CUDA_SUCCESS) r = r2;
    }
    *handle = static_cast<Handle>(h);
    return r;
  }
  int release(Handle handle) override { return d_.MemRelease(static_cast<CUmemGenericAllocationHandle>(handle)); }
  int map(uintptr_t va, size_t size, Handle handle) override {
    return d_.MemMap(va, size, 0, static_cast<CUmemGenericAllocationHandle>(handle), 0);
  }
  int unmap(uintptr_t va, size_t size) override { return d_.MemUnmap(va, size); }
  int set_access(uintptr_t va, size_t size, int device) override {
    CUmemAccessDesc desc = {};
    desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    desc.location.id = device;
    desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    return d_.MemSetAccess(va, size, &desc, 1);
  }

  int stream_create(int device, Stream* stream) override {
    if (int r = bind(device)) return r;
    CUstream s = nullptr;
    CUresult r = d_.StreamCreate(&s, CU_STREAM_NON_BLOCKING);
    *stream = reinterpret_cast<Stream>(s);
    return r;
  }
  int copy_async(uintptr_t dst, uintptr_t src, size_t size, Stream stream) override {
    return d_.MemcpyAsync(dst, src, size, reinterpret_cast<CUstream>(stream));
  }
  int event_create(Event* event) override {
    CUevent e = nullptr;
    CUresult r = d_.EventCreate(&e, CU_EVENT_DISABLE_TIMING);
    *event = reinterpret_cast<Event>(e);
    return r;
  }
  int event_destroy(Event event) override { return d_.EventDestroy(reinterpret_cast<CUevent>(event)); }
  int event_record(Event event, Stream stream) override {
    return d_.EventRecord(reinterpret_cast<CUevent>(event), reinterpret_cast<CUstream>(stream));
  }
  int event_sync(Event event) override { return d_.EventSynchronize(reinterpret_cast<CUevent>(event)); }
  int stream_wait_event(Stream stream, Event event) override {
    return d_.StreamWaitEvent(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUevent>(event), 0);
  }

  int flag_create(uint32_t** host, uintptr_t* device_addr) override {
    if (!d_.MemHostAlloc || !d_.MemHostGetDevicePointer) return CUDA_ERROR_NOT_SUPPORTED;
    void* p = nullptr;
    // Portable (every context may use it) and mapped into the devices' address space.
    if (CUresult r = d_.MemHostAlloc(&p, 64, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP)) return r;
    CUdeviceptr d = 0;
    if (CUresult r = d_.MemHostGetDevicePointer(&d, p, 0)) return r;  // the page stays: one per core
    *host = static_cast<uint32_t*>(p);
    **host = 0;
    *device_addr = static_cast<uintptr_t>(d);
    return CUDA_SUCCESS;
  }

  int stream_wait_value(Stream stream, uintptr_t device_addr, uint32_t value) override {
    if (!d_.StreamWaitValue32) return CUDA_ERROR_NOT_SUPPORTED;
    return d_.StreamWaitValue32(reinterpret_cast<CUstream>(stream), static_cast<CUdeviceptr>(device_addr), value,
                                CU_STREAM_WAIT_VALUE_GEQ);
  }

 private:
  CUmemAllocationProp prop_for(int tier) const {
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    if (tier == AQUA_TIER_HOST) {
      prop.location.type = CU_MEM_LOCATION_TYPE_HOST_NUMA;
      prop.location.id = 0;
    } else {
      prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
      prop.location.id = tier;
    }
    return prop;
  }

  void* lib_ = nullptr;
  Driver d_;
  std::vector<CUdevice> devices_;
  std::vector<CUcontext> contexts_;
  std::vector<bool> peer_;
  size_t granularity_ = 0;
};

}  // namespace

Backend* make_cuda_backend(std::string* why) {
  auto* cuda = new CudaBackend();
  if (!cuda->init(why)) {
    delete cuda;  // the dlopen handle stays: unloading a driver mid-process is unsafe
    return nullptr;
  }
  return cuda;
}

}  // namespace aqua
