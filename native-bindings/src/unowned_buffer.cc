// An ArrayBuffer over memory it does not own. N-API's external ArrayBuffers count their length as
// external memory, so V8 ran a full GC for nearly every 1 GiB guest chunk a worker viewed (over
// half a second per worker for a 64 GiB guest). Guest RAM is not V8's to account or free: this
// buffer has the empty deleter, which V8 neither counts nor calls. Whoever hands it out keeps the
// memory alive for as long as the buffer is reachable (memory.c: a wrapped reference).
#include <node_api.h>
#include <v8.h>

#include <memory>

extern "C" napi_status vubd_unowned_arraybuffer(napi_env env, void *data, size_t length, napi_value *result) {
  v8::Isolate *isolate = v8::Isolate::GetCurrent(); // the caller's thread runs env's isolate
  if (isolate == nullptr || data == nullptr) return napi_generic_failure;
  std::unique_ptr<v8::BackingStore> store =
      v8::ArrayBuffer::NewBackingStore(data, length, v8::BackingStore::EmptyDeleter, nullptr);
  v8::Local<v8::ArrayBuffer> buffer = v8::ArrayBuffer::New(isolate, std::move(store));
  // A napi_value is a v8::Local<v8::Value> in the callback's handle scope (node's js_native_api_v8.h).
  *result = reinterpret_cast<napi_value>(*buffer);
  return napi_ok;
}
